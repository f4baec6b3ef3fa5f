"""The queue owner's backlog duties against a real etcd, with no agent process: dispatch
rounds over a snapshot, entries ended without room (cancelled, past their deadline), a
deposed owner refused, and a claimed task that outlives the owner that claimed it.

Placement is a recording stand-in, so each round's outcome is read from etcd and from
what it asked to place, with no timing involved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aetcd
import pytest
from support import eventually

from mesh import metrics
from mesh.agent.dispatch import DcRoom, Deposed
from mesh.agent.duties import Duties
from mesh.agent.history import History
from mesh.agent.owner import QueueOwner
from mesh.core import backlog
from mesh.core.backlog import Room
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.core.priority import Traits, Weighted
from mesh.core.task import state_name
from mesh.errors import Unavailable
from mesh.store import kv
from mesh.store.backlog import Backlog as BacklogStore
from mesh.store.election import Election
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.records import Stored, TaskStore
from mesh.store.session import Session
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

HOUR_MS = 3_600_000
ROUND_GUARD_S = 10  # a hang guard: a round that does not end within it never would


@dataclass
class Placed:
    jobs: list[Job] = field(default_factory=list)

    async def __call__(self, job: Job) -> str:
        self.jobs.append(job)
        return "an agent"

    @property
    def ids(self) -> list[str]:
        return [job.task_id for job in self.jobs]


@dataclass
class Backlog:
    """Records and backlog entries written straight into etcd, as placement writes them."""

    client: aetcd.Client
    keys: KeySpace
    store: TaskStore
    snapshot: dict[str, bytes] = field(default_factory=dict)

    async def add(
        self,
        task_id: str,
        enqueued_ms: int,
        *,
        deadline_ms: int | None = None,
        state: int = pb.TASK_STATE_QUEUED,
        entry_in_etcd: bool = True,
        model: str = "m",
        cancel_requested: bool = False,
    ) -> bytes:
        deadline = deadline_ms if deadline_ms is not None else now_ms() + HOUR_MS
        status = pb.TaskStatus(task_id=task_id, state=state, dc="west", attempt=1)
        status.spec.CopyFrom(
            pb.TaskSpec(task_id=task_id, pipeline="echo", model=model, queue="normal")
        )
        status.deadline.FromMilliseconds(deadline)
        record = peer_pb2.TaskRecord(status=status, cancel_requested=cancel_requested)
        await self.store.create(record)
        key = self.keys.backlog_entry("normal", enqueued_ms, task_id)
        value = backlog.entry_value(deadline, Traits("normal"))
        if entry_in_etcd:
            await self.client.put(key, value)
        self.snapshot[key[len(self.keys.backlog) :].decode()] = value
        return key

    async def status(self, task_id: str) -> pb.TaskStatus:
        return (await self.store.get(task_id)).status

    async def exists(self, key: bytes) -> bool:
        return await self.client.get(key) is not None


@pytest.fixture
async def waiting(etcd_client: aetcd.Client, prefix: str) -> Backlog:
    keys = KeySpace(prefix, "west")
    return Backlog(etcd_client, keys, TaskStore(EtcdKv(etcd_client), keys))


@pytest.fixture
async def owners(
    etcd_client: aetcd.Client, waiting: Backlog
) -> AsyncIterator[Callable[..., object]]:
    sessions: list[Session] = []

    async def make(
        name: str = "owner",
        place: Placed | None = None,
        room: Callable[[pb.TaskSpec], Room] = lambda _: Room.FREE,
        campaign: bool = True,
        store: TaskStore | None = None,
        reconcile: Callable[[], Awaitable[None]] | None = None,  # one DC: none pending
    ) -> QueueOwner:
        session = Session(EtcdKv(etcd_client), ttl_s=30)
        await session.open()
        sessions.append(session)
        election = Election(
            EtcdKv(etcd_client),
            waiting.keys.election,
            lambda: session.lease_id,
            f"{name} -".encode(),
        )
        owner = QueueOwner(
            name,
            election,
            store or waiting.store,
            BacklogStore(EtcdKv(etcd_client), waiting.keys, store or waiting.store),
            place or Placed(),
            DcRoom(room, lambda: 1, lambda: 1),
            Weighted({"vip": 8, "normal": 2}, aging_s=30),
            max_attempts=3,
            history=History(None, name, "west"),
            handoffs=None,  # type: ignore[arg-type]  # no hand-off in these tests
            reconcile=reconcile or asyncio.Event().wait,
        )
        if campaign:
            await election.campaign()
        return owner

    try:
        yield make
    finally:
        for session in sessions:
            await session.close()


async def bounded_round(owner: QueueOwner, snapshot: dict[str, bytes]) -> int:
    try:
        async with asyncio.timeout(ROUND_GUARD_S):
            return await owner.dispatcher.dispatch_round(snapshot)
    except TimeoutError:
        raise AssertionError("the dispatch round never ended") from None


async def test_a_round_ends_past_an_entry_another_consumer_took_and_finished(
    waiting: Backlog, owners: Callable[..., object]
) -> None:
    # The snapshot still lists "taken" (the mirror lags), but its entry is already gone
    # from etcd and its task ran and finished. The round must drop it and go on.
    await waiting.add("taken", 1_000, state=pb.TASK_STATE_SUCCEEDED, entry_in_etcd=False)
    live = await waiting.add("live", 2_000)
    placed = Placed()
    owner = await owners(place=placed)  # type: ignore[operator]
    assert await bounded_round(owner, waiting.snapshot) == 1
    await eventually(lambda: placed.ids, timeout_s=ROUND_GUARD_S, what="a placement")
    assert placed.ids == ["live"]
    assert not await waiting.exists(live)
    status = await waiting.status("live")
    assert (state_name(status.state), status.agent) == ("PENDING", "owner")
    assert state_name((await waiting.status("taken")).state) == "SUCCEEDED"


async def test_a_round_looks_at_each_entry_once_however_each_ends(
    waiting: Backlog, owners: Callable[..., object]
) -> None:
    await waiting.add("gone-record", 1_000)
    await waiting.store.delete(await waiting.store.get("gone-record"))
    await waiting.add("placed-meanwhile", 2_000)
    await waiting.store.update(
        "placed-meanwhile", lambda r: setattr(r.status, "agent", "w9") or None
    )
    await waiting.add("cancelled", 3_000, cancel_requested=True)
    await waiting.add("late", 4_000, deadline_ms=now_ms() - 1)
    ready = await waiting.add("ready", 5_000)
    placed = Placed()
    owner = await owners(place=placed)  # type: ignore[operator]
    assert await bounded_round(owner, waiting.snapshot) == 1
    await eventually(lambda: placed.ids, timeout_s=ROUND_GUARD_S, what="a placement")
    assert placed.ids == ["ready"]
    assert not await waiting.exists(ready)
    leftover = await waiting.client.get_prefix(waiting.keys.backlog)
    assert list(leftover) == [], "every entry looked at was taken out"
    cancelled, late = await waiting.status("cancelled"), await waiting.status("late")
    assert (state_name(cancelled.state), cancelled.error.code) == ("CANCELLED", "CANCELLED")
    assert (state_name(late.state), late.error.code) == ("FAILED", "DEADLINE_EXCEEDED")
    assert (await waiting.status("placed-meanwhile")).agent == "w9"  # left alone


async def test_past_their_deadline_entries_end_even_with_no_room(
    waiting: Backlog, owners: Callable[..., object]
) -> None:
    late = await waiting.add("late", 1_000, deadline_ms=now_ms() - 1)
    fresh = await waiting.add("fresh", 2_000)
    placed = Placed()
    owner = await owners(place=placed, room=lambda _: Room.FULL)  # type: ignore[operator]
    assert await owner.dispatcher.expire(waiting.snapshot) == 1
    assert await bounded_round(owner, waiting.snapshot) == 0
    assert placed.ids == []
    assert not await waiting.exists(late)
    assert await waiting.exists(fresh)
    assert state_name((await waiting.status("late")).state) == "FAILED"
    assert state_name((await waiting.status("fresh")).state) == "QUEUED"


async def test_a_task_no_agent_here_can_run_does_not_block_the_others(
    waiting: Backlog, owners: Callable[..., object]
) -> None:
    stranded = await waiting.add("stranded", 1_000, model="nobody-serves-it")
    await waiting.add("runnable", 2_000)
    placed = Placed()

    def room(spec: pb.TaskSpec) -> Room:
        return Room.NOT_HERE if spec.model == "nobody-serves-it" else Room.FREE

    owner = await owners(place=placed, room=room)  # type: ignore[operator]
    assert await bounded_round(owner, waiting.snapshot) == 1
    await eventually(lambda: placed.ids, timeout_s=ROUND_GUARD_S, what="a placement")
    assert placed.ids == ["runnable"]
    assert await waiting.exists(stranded)


async def test_a_deposed_owner_takes_nothing(
    waiting: Backlog, owners: Callable[..., object]
) -> None:
    entry = await waiting.add("t", 1_000)
    placed = Placed()
    owner = await owners(place=placed)  # type: ignore[operator]
    await waiting.client.delete(owner.election.key)  # its lease expired while it slept
    await owners(name="successor")  # type: ignore[operator]
    with pytest.raises(Deposed):
        await bounded_round(owner, waiting.snapshot)
    assert placed.ids == []
    assert await waiting.exists(entry)
    assert state_name((await waiting.status("t")).state) == "QUEUED"


async def test_a_task_claimed_by_an_owner_that_died_is_placed_by_the_next(
    waiting: Backlog, owners: Callable[..., object]
) -> None:
    await waiting.add("t", 1_000)

    async def dies(job: Job) -> str:
        raise asyncio.CancelledError  # the owner's process is gone before it places

    first = await owners(name="first", place=dies)  # type: ignore[operator]
    assert await bounded_round(first, waiting.snapshot) == 1
    await first.election.resign()
    claimed = await waiting.status("t")
    assert (state_name(claimed.state), claimed.agent) == ("PENDING", "first")
    placed = Placed()
    second = await owners(name="second", place=placed, campaign=False)  # type: ignore[operator]
    second.members_changed({"second": "its record"})  # "first" is no member: dead
    leading = asyncio.create_task(second.run())
    try:
        await eventually(
            lambda: placed.ids, timeout_s=ROUND_GUARD_S, what="the next owner to place it"
        )
    finally:
        leading.cancel()
        await asyncio.gather(leading, return_exceptions=True)
    assert placed.ids == ["t"]
    again = await waiting.status("t")
    assert (again.attempt, state_name(again.state)) == (2, "PENDING")


class BouncingStore(TaskStore):
    """Reads a record, then lets a placement put the task back into the backlog under
    the same key (it keeps its age) before the round acts on what it read."""

    def __init__(self, waiting: Backlog, task_id: str) -> None:
        super().__init__(EtcdKv(waiting.client), waiting.keys)
        self._waiting, self._task_id, self.bounced = waiting, task_id, False

    async def get(self, task_id: str) -> Stored:
        stored = await super().get(task_id)
        if task_id == self._task_id and not self.bounced:
            self.bounced = True

            def back(record: peer_pb2.TaskRecord) -> None:
                record.status.state, record.status.agent = pb.TASK_STATE_QUEUED, ""

            key = self._waiting.keys.backlog_entry("normal", 1_000, task_id)
            put = kv.Put(key, backlog.entry_value(now_ms() + HOUR_MS, Traits("normal")))
            await self.update(task_id, back, also=[put])
        return stored


async def test_a_stale_entry_is_not_dropped_once_its_task_is_back_in_the_backlog(
    waiting: Backlog, owners: Callable[..., object]
) -> None:
    # The snapshot lists the entry; the record says the task is being placed (stale
    # entry). Before the round drops it, the placement puts the task back: same key.
    entry = await waiting.add("bounced", 1_000, state=pb.TASK_STATE_PENDING)
    await waiting.client.delete(entry)
    bouncing = BouncingStore(waiting, "bounced")
    owner = await owners(store=bouncing, room=lambda _: Room.FULL)  # type: ignore[operator]
    await bounded_round(owner, waiting.snapshot)
    assert bouncing.bounced
    assert await waiting.exists(entry), "the fresh entry of a waiting task was dropped"
    assert state_name((await waiting.status("bounced")).state) == "QUEUED"


async def test_an_owner_whose_reconcile_raises_while_it_leads_hands_the_dc_over(
    owners: Callable[..., object], waiting: Backlog
) -> None:
    """Seed 7's lost backlog: etcd went away, the owner's reconcile raised, and the owner
    ended without a word while its election key lived on, so nobody dispatched again.
    Now the term ends, the owner resigns at once, and the next candidate leads."""

    async def reconcile() -> None:
        raise Unavailable("etcd: no leader")

    first = await owners("first", reconcile=reconcile)  # type: ignore[operator]
    second = await owners("second", campaign=False)  # type: ignore[operator]
    resigned = metrics.OWNER_RESIGNED.labels("failed")._value.get()
    duties = Duties()
    try:
        duties.keep("second", second.run)  # behind first, waiting for its key to go
        duties.keep("first", first.run)

        async def second_leads() -> bool:
            leader = await second.election.leader()
            return leader is not None and leader[0].startswith(b"second")

        await eventually(second_leads, what="the next candidate to lead")
        assert metrics.OWNER_RESIGNED.labels("failed")._value.get() > resigned
    finally:
        await duties.stop()
