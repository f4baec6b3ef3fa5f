"""The DC's backlog as its queue owner works it: dispatch rounds and claims (the tasks it
took are placed by ``mesh.agent.placements``).

Each tick (or sooner, when the backlog or capacity changes) the dispatcher ends the
entries whose deadline passed, then runs one round over a snapshot of the backlog
(``mesh.core.backlog.Round``): every entry is placed, ended, dropped as stale, or ends
the round for want of room, so a round always ends. An entry leaves only by a claim, one
transaction fenced by the owner's term that changes the task's record with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from mesh import metrics
from mesh.agent.history import History
from mesh.agent.placements import PLACE_RETRY_S, Placements
from mesh.core import backlog
from mesh.core.backlog import Room, Verdict, Waiting
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.core.lifecycle import end
from mesh.core.priority import Policy
from mesh.errors import StaleWrite, TaskNotFound, Unavailable, Unsure
from mesh.store.backlog import Backlog
from mesh.store.election import Election
from mesh.store.records import Stored, TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

DISPATCH_TICK_S = 0.5  # capacity frees without the backlog changing: look again this often
STUCK_AFTER_S = 10.0  # the oldest entry waited this long while the DC had free slots: warn

ENDINGS = {
    Verdict.CANCEL: (pb.TASK_STATE_CANCELLED, "CANCELLED", "cancelled while in the backlog"),
    Verdict.EXPIRE: (pb.TASK_STATE_FAILED, "DEADLINE_EXCEEDED", "deadline passed in the backlog"),
}


class Outcome(Enum):
    """What became of one entry in a dispatch round."""

    DISPATCHED = "dispatched"
    SKIPPED = "skipped"  # ended, dropped as stale, or waiting for an eligible agent
    NO_ROOM = "no room"  # its eligible agents are full: the round ends


class Deposed(StaleWrite):
    """This owner's term is over: another candidate leads the DC's queue now."""


async def still_leading(election: Election) -> None:
    """Raise ``Deposed`` unless ``election``'s term still holds."""
    if not await election.leads():
        raise Deposed("no longer the queue owner", term=election.term)


@dataclass(frozen=True)
class DcRoom:
    """The router's view of the DC as the owner asks it: ``room_for`` whether an agent
    could take a task now, ``free_slots`` how many GPU slots it sees idle, ``room_left``
    how many more tasks the DC's agents could hold."""

    room_for: Callable[[pb.TaskSpec], Room]
    free_slots: Callable[[], int]
    room_left: Callable[[], int]


class Dispatcher:
    def __init__(
        self,
        agent_id: str,
        election: Election,
        store: TaskStore,
        backlog: Backlog,
        room: DcRoom,
        policy: Policy,
        history: History,
        placements: Placements,
        wake: asyncio.Event,
    ) -> None:
        """``wake`` is set when the backlog or capacity changes."""
        self.agent_id = agent_id
        self._election = election
        self._store = store
        self._backlog = backlog
        self._room = room
        self.policy = policy  # replaced when the priority settings change
        self._history = history
        self._placements = placements
        self._wake = wake
        self._warned_at = 0
        self._dispatched_at = 0
        self.ticked = 0.0  # loop time the dispatch loop last came round (the watchdog's)

    async def run(self) -> None:
        """Each tick (or sooner, when the backlog or capacity changes): end what expired,
        then one dispatch round over a snapshot of the backlog, then look again."""
        mirror = self._backlog.mirror(lambda _: self._wake.set())
        watching = asyncio.create_task(mirror.run(), name="backlog mirror")
        try:
            await mirror.ready.wait()
            while True:
                self.ticked = asyncio.get_running_loop().time()
                if watching.done():  # a mirror that ended would leave the snapshot stale
                    watching.result()
                    raise Unavailable("the backlog mirror ended")
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
                # cancellation that races its timeout, and the owner would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DISPATCH_TICK_S):
                        await self._wake.wait()
                self._wake.clear()
                snapshot = dict(mirror.items)
                await self.expire(snapshot)
                dispatched = await self.dispatch_round(snapshot)
                self._report(snapshot, dispatched)
        finally:
            watching.cancel()

    async def expire(self, snapshot: Mapping[str, bytes]) -> int:
        """End every entry whose deadline its value says has passed; how many ended."""
        ended = 0
        for waiting in backlog.expired(snapshot, now_ms()):
            ended += await self._end(waiting)
        return ended

    async def dispatch_round(self, snapshot: Mapping[str, bytes]) -> int:
        """One pass over ``snapshot`` (backlog key tails and values), best entry first.

        Every entry looked at is placed, ended, dropped as stale, or ends the round (no
        room for it now), so the round ends after at most ``len(snapshot)`` entries and
        the next one starts from a fresh mirror. Returns how many entries it dispatched.
        Raises ``Deposed`` once another owner leads.
        """
        now = now_ms()
        dispatching = backlog.Round(backlog.entries(snapshot), self.policy)
        dispatched = 0
        while (waiting := dispatching.pop(now)) is not None:
            outcome = await self._consider(waiting, now)
            if outcome is Outcome.DISPATCHED:
                dispatched += 1
                continue
            dispatching.refund()  # it took no capacity: its class keeps its turn
            if outcome is Outcome.NO_ROOM:
                break
        return dispatched

    async def _consider(self, waiting: Waiting, now: int) -> Outcome:
        """Dispatch, end or drop one entry, or find no room for it."""
        try:
            stored = await self._store.get(waiting.task_id)
        except TaskNotFound:
            await self._claim(waiting, None)  # its record is gone: drop the entry
            return Outcome.SKIPPED
        verdict = backlog.judge(stored.record, now)
        if verdict is Verdict.STALE:
            await self._claim(waiting, stored)
            return Outcome.SKIPPED
        if verdict is not Verdict.DISPATCH:
            await self._end(waiting)
            return Outcome.SKIPPED
        room = self._room.room_for(stored.status.spec)
        # The view learns of a placement only once it lands: tasks still being placed
        # count against the room left, or one round would send a whole backlog at it.
        if room is Room.FULL or len(self._placements) >= max(1, self._room.room_left()):
            return Outcome.NO_ROOM
        # NOT_HERE: no agent of the DC can run it now; it waits without blocking the
        # others (an eligible agent may join before its deadline).
        if room is Room.FREE and await self._take(waiting):
            return Outcome.DISPATCHED
        return Outcome.SKIPPED

    def _report(self, snapshot: Mapping[str, bytes], dispatched: int) -> None:
        """Depth and oldest age per class as metrics; a warning when the backlog has not
        moved for ``STUCK_AFTER_S`` while its oldest entry aged and the DC had idle slots
        (it should have been dispatched)."""
        now = now_ms()
        oldest = 0
        for name, depth in backlog.depths(backlog.by_class(snapshot)).items():
            age_s = (now - depth.oldest_ms) / 1000 if depth.depth else 0.0
            metrics.BACKLOG_DEPTH.labels(name).set(depth.depth)
            metrics.BACKLOG_OLDEST.labels(name).set(max(0.0, age_s))
            oldest = max(oldest, int(age_s * 1000))
        if dispatched:
            self._dispatched_at = now
        free = self._room.free_slots()
        still = now - self._dispatched_at > STUCK_AFTER_S * 1000
        if oldest > STUCK_AFTER_S * 1000 and free > 0 and still:
            metrics.BACKLOG_STALLS.inc()
            if now - self._warned_at > STUCK_AFTER_S * 1000:
                self._warned_at = now
                log.warning(
                    "backlog not moving: oldest entry waited %.0fs, %d slot(s) free",
                    oldest / 1000,
                    free,
                )

    def _entry_key(self, waiting: Waiting) -> bytes:
        return self._backlog.entry(waiting.queue_class, waiting.enqueued_ms, waiting.task_id)

    async def _claim(self, waiting: Waiting, judged: Stored | None) -> None:
        """Delete the entry, fenced, without touching its record: the record is gone
        (``judged`` None) or has moved on (as ``judged`` shows it). Refused if the record
        changed since: a task put back into the backlog reuses its key (it keeps its
        age), and its fresh entry must not go with the stale one."""
        token = self._election.term
        revision = await self._backlog.drop(
            self._entry_key(waiting),
            waiting.task_id,
            None if judged is None else judged.revision,
            self._election.fence(),
        )
        ok = revision is not None
        self._history.write(
            "claim", "ok" if ok else "rejected", task=waiting.task_id, token=token, rev=revision
        )
        if not ok:
            await still_leading(self._election)  # else the record moved: the next round looks again

    async def _claim_with(
        self, waiting: Waiting, mutate: Callable[[peer_pb2.TaskRecord], bool | None]
    ) -> Stored | None:
        """Delete the entry and change its record in one fenced transaction; None if the
        entry was gone (someone took it first) or ``mutate`` found nothing to do (the
        record moved on: the next round judges it again)."""
        token = self._election.term
        applied = False

        def apply(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal applied
            applied = mutate(record) is not False
            record.backlog_entry = ""  # the entry goes with this write
            return None if applied else False

        try:
            updated = await self._backlog.take(
                waiting.task_id, self._entry_key(waiting), apply, (self._election.fence(),)
            )
        except (StaleWrite, TaskNotFound):
            self._history.write("claim", "rejected", task=waiting.task_id, token=token)
            await still_leading(self._election)
            return None
        if not applied:
            return None
        self._history.write("claim", "ok", task=waiting.task_id, token=token, rev=updated.revision)
        return updated

    async def _take(self, waiting: Waiting) -> bool:
        """Claim the entry for dispatch; the record names this agent until placed."""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            if backlog.judge(record, now_ms()) is not Verdict.DISPATCH:
                return False
            record.status.state = pb.TASK_STATE_PENDING
            record.status.agent = self.agent_id
            return None

        try:
            updated = await self._claim_with(waiting, mutate)
        except Unsure:
            # etcd may have applied it: the record would name this agent with no entry
            # left, and nobody else places such a task. Read it back once etcd answers.
            self._placements.track(f"claim of {waiting.task_id}", self._if_claimed(waiting))
            return True
        if updated is None:
            return False
        self._placements.spawn(backlog_job(updated, waiting))
        return True

    async def _if_claimed(self, waiting: Waiting) -> None:
        """Place the task of an unsure claim if the claim landed (its record names this
        agent, pending, with no backlog entry); if not, its entry is still there and a
        round dispatches it. Asked until etcd answers, up to the task's deadline."""
        tries = 0
        while True:
            try:
                stored = await self._store.get(waiting.task_id)
                break
            except TaskNotFound:
                return
            except Unavailable:
                if waiting.deadline_ms and now_ms() > waiting.deadline_ms:
                    return  # the entry's expiry, or the owner's sweep, ends it
                await asyncio.sleep(PLACE_RETRY_S[min(tries, len(PLACE_RETRY_S) - 1)])
                tries += 1
        status, record = stored.status, stored.record
        mine = status.state == pb.TASK_STATE_PENDING and status.agent == self.agent_id
        if mine and not record.backlog_entry and not record.forwarded_to_dc:
            self._placements.spawn(backlog_job(stored, waiting))

    async def _end(self, waiting: Waiting) -> int:
        """End the entry's task as its record says (cancelled, or past its deadline) and
        take the entry, in one transaction; 1 if this call ended it."""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            ending = ENDINGS.get(backlog.judge(record, now_ms()))
            if ending is None:
                return False
            end(record.status, *ending)
            return None

        updated = await self._claim_with(waiting, mutate)
        if updated is None:
            return 0
        metrics.BACKLOG_ENDED.labels(updated.status.error.code).inc()
        return 1


def backlog_job(stored: Stored, waiting: Waiting) -> Job:
    """The job a claimed entry's record describes, placed from the backlog."""
    status = stored.status
    return Job(
        status.spec,
        status.attempt,
        status.deadline.ToMilliseconds(),
        ["backlog"],
        enqueued_ms=waiting.enqueued_ms,
        traceparent=stored.record.traceparent,
    )


def describe(
    dc: str, leader: tuple[bytes, int] | None, names: list[str], queues: list[str]
) -> pb.QueueResponse:
    """The DC's queue as anyone can read it: its owner and term (``leader``, the
    election's), and its backlog (the entries' ``names``)."""
    now = now_ms()
    reply = pb.QueueResponse(dc=dc)
    if leader is not None:
        reply.owner, reply.term = leader[0].decode().split()[0], leader[1]
    waiting = backlog.by_class(dict.fromkeys(names, b""))
    for name in sorted({*queues, *waiting}):
        entries = waiting.get(name, [])
        oldest = (now - entries[0].enqueued_ms) / 1000 if entries else 0.0
        reply.classes.add(name=name, depth=len(entries), oldest_wait_s=max(0.0, oldest))
    return reply
