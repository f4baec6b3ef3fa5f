"""The DC's queue owner: the one leader in the mesh, elected per DC through etcd.

While it leads, it dispatches the DC's durable backlog (``mesh.core.backlog``) as capacity
frees, by class weight and age, ends entries whose task was cancelled or whose deadline
passed while they waited (whether or not there is room), and re-places the work of
agents that died: when an agent's membership key goes (its lease expired: crashed, or
paused past the TTL), every task still recorded on it (queued, or running: its running
marker went with the same lease) gets attempt + 1 and is placed again, or fails with the
reason once ``max_attempts`` runs have been tried, or when its payload was only held by
the dead agent. On taking office it also sweeps for tasks left on agents that are no
longer members, which covers deaths while nobody led.

Every write is fenced by the leadership (a deposed owner cannot write), and the bumped
attempt fences the dead agent: should it come back, its late writes are refused. A
backlog entry is taken by a claim that changes its record in the same transaction: a
dispatched task's record names this agent until an agent accepts it, so if the owner
dies in between, the next owner finds it among the dead agent's tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from enum import Enum

from mesh import metrics
from mesh.agent.history import History
from mesh.core import backlog
from mesh.core.backlog import Room, Verdict, Waiting
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.core.lifecycle import end, requeue
from mesh.core.queue import Discipline
from mesh.core.task import TERMINAL
from mesh.errors import MeshError, StaleWrite, TaskNotFound, Unavailable
from mesh.store.election import Election
from mesh.store.etcd import ETCD_ERRORS, KeySpace
from mesh.store.mirror import PrefixMirror
from mesh.store.records import Stored, TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

DISPATCH_TICK_S = 0.5  # capacity frees without the backlog changing: look again this often
STUCK_AFTER_S = 10.0  # the oldest entry waited this long while the DC had free slots: warn
PLACE_RETRY_S = (0.2, 0.5, 1.0, 2.0)  # placing a claimed task again after etcd trouble


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


class QueueOwner:
    def __init__(
        self,
        agent_id: str,
        election: Election,
        store: TaskStore,
        keys: KeySpace,
        place: Callable[[Job], Awaitable[str]],
        room_for: Callable[[pb.TaskSpec], Room],
        free_slots: Callable[[], int],
        room_left: Callable[[], int],
        discipline: Discipline,
        max_attempts: int,
        history: History,
    ) -> None:
        """``place`` places a job (into the backlog if nothing can take it); ``room_for``
        says whether the router sees room for a task now (``Room``), ``free_slots`` how
        many GPU slots of the DC it sees idle, ``room_left`` how many more tasks the DC's
        agents could hold. ``history`` hears every term and every fenced write with the
        token it carried."""
        self.agent_id = agent_id
        self.election = election
        self._store = store
        self._keys = keys
        self._place = place
        self._room_for = room_for
        self._free_slots = free_slots
        self._room_left = room_left
        self.discipline = discipline
        self._max_attempts = max_attempts
        self._history = history
        self._wake = asyncio.Event()
        self._members: frozenset[str] = frozenset()
        self._departed: asyncio.Queue[str] = asyncio.Queue()
        self._placing: set[asyncio.Task[None]] = set()
        self._warned_at = 0
        self._dispatched_at = 0

    def members_changed(self, members: Iterable[str]) -> None:
        current = frozenset(members)
        for agent_id in sorted(self._members - current):
            self._departed.put_nowait(agent_id)
        self._members = current

    def capacity_changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Campaign, then lead until cancelled (the agent cancels it when its lease is lost).
        etcd trouble on the way makes it stand again, not give up. Placements under way
        go on across a new campaign: each ends by itself (placed, or by its deadline)."""
        try:
            while True:
                try:
                    term = await self.election.campaign()
                    log.info("queue owner of the DC", extra={"term": term})
                    self._history.write("owner", "elected", token=term)
                    metrics.OWNER_TERMS.inc()
                    async with asyncio.TaskGroup() as duties:  # one fails: both stop
                        duties.create_task(self._recover_orphans())
                        duties.create_task(self._dispatch())
                except* MeshError as trouble:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise asyncio.CancelledError from None  # stopping
                    log.warning("queue owner: %s; standing again", trouble.exceptions[0])
                    metrics.DUTY_ERRORS.labels("queue owner").inc()
                    await asyncio.sleep(1)
        finally:
            for task in list(self._placing):
                task.cancel()

    async def _recover_orphans(self) -> None:
        await self._sweep(lambda agent: agent not in self._members)
        while True:
            gone = await self._departed.get()
            self._history.write("departed", "seen", member=gone, token=self.election.term)
            await self._sweep(lambda agent, gone=gone: agent == gone)

    async def _dispatch(self) -> None:
        """Each tick (or sooner, when the backlog or capacity changes): end what expired,
        then one dispatch round over a snapshot of the backlog, then look again."""
        mirror = PrefixMirror(self._store.client, self._keys.backlog, lambda _: self._wake.set())
        watching = asyncio.create_task(mirror.run(), name="backlog mirror")
        try:
            await mirror.ready.wait()
            while True:
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

    # -- the backlog ---------------------------------------------------------------------

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
        dispatching = backlog.Round(backlog.by_class(snapshot), self.discipline)
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
        room = self._room_for(stored.status.spec)
        # The view learns of a placement only once it lands: tasks still being placed
        # count against the room left, or one round would send a whole backlog at it.
        if room is Room.FULL or len(self._placing) >= max(1, self._room_left()):
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
        free = self._free_slots()
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
        return self._keys.backlog_entry(waiting.queue_class, waiting.enqueued_ms, waiting.task_id)

    async def _claim(self, waiting: Waiting, judged: Stored | None) -> None:
        """Delete the entry, fenced, without touching its record: the record is gone
        (``judged`` None) or has moved on (as ``judged`` shows it). Refused if the record
        changed since: a task put back into the backlog reuses its key (it keeps its
        age), and its fresh entry must not go with the stale one."""
        key = self._entry_key(waiting)
        record = self._keys.task(waiting.task_id)
        tx = self._store.client.transactions
        unchanged = tx.version(record) == 0 if judged is None else tx.mod(record) == judged.revision
        token = self.election.term
        try:
            ok, responses = await self._store.client.transaction(
                compare=[self.election.fence(), unchanged],
                success=[tx.delete(key)],
                failure=[],
            )
        except ETCD_ERRORS as exc:
            raise Unavailable(f"backlog claim failed: {exc}") from exc
        revision = responses[0].response_delete_range.header.revision if ok else None
        self._history.write(
            "claim", "ok" if ok else "rejected", task=waiting.task_id, token=token, rev=revision
        )
        if not ok:
            await self._still_leading()  # else the record moved: the next round looks again

    async def _claim_with(
        self, waiting: Waiting, mutate: Callable[[peer_pb2.TaskRecord], bool | None]
    ) -> Stored | None:
        """Delete the entry and change its record in one fenced transaction; None if the
        entry was gone (someone took it first) or ``mutate`` found nothing to do (the
        record moved on: the next round judges it again)."""
        key = self._entry_key(waiting)
        tx = self._store.client.transactions
        token = self.election.term
        applied = False

        def apply(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal applied
            applied = mutate(record) is not False
            return None if applied else False

        try:
            updated = await self._store.update(
                waiting.task_id,
                apply,
                fence=[self.election.fence(), tx.version(key) > 0],
                also=[tx.delete(key)],
            )
        except (StaleWrite, TaskNotFound):
            self._history.write("claim", "rejected", task=waiting.task_id, token=token)
            await self._still_leading()
            return None
        if not applied:
            return None
        self._history.write("claim", "ok", task=waiting.task_id, token=token, rev=updated.revision)
        return updated

    async def _still_leading(self) -> None:
        """Raise ``Deposed`` unless this owner's term still holds."""
        if not await self.election.leads():
            raise Deposed("no longer the queue owner", term=self.election.term)

    async def _take(self, waiting: Waiting) -> bool:
        """Claim the entry for dispatch; the record names this agent until placed."""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            if backlog.judge(record, now_ms()) is not Verdict.DISPATCH:
                return False
            record.status.state = pb.TASK_STATE_PENDING
            record.status.agent = self.agent_id
            return None

        updated = await self._claim_with(waiting, mutate)
        if updated is None:
            return False
        status = updated.status
        job = Job(
            status.spec,
            status.attempt,
            status.deadline.ToMilliseconds(),
            ["backlog"],
            enqueued_ms=waiting.enqueued_ms,
        )
        self._spawn_placement(job)
        return True

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

    # -- dead agents ---------------------------------------------------------------------

    async def _sweep(self, dead: Callable[[str], bool]) -> None:
        for stored in await self._store.scan():
            status = stored.status
            if status.state in TERMINAL or stored.record.forwarded_to_dc:
                continue
            if status.agent and dead(status.agent):
                try:
                    await self._requeue(stored)
                except Deposed:
                    raise
                except MeshError as exc:
                    log.warning("could not re-queue %s: %s", status.task_id, exc)

    async def _requeue(self, stored: Stored) -> None:
        dead_agent = stored.status.agent
        verdict = ""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal verdict
            verdict = requeue(record, dead_agent, self._max_attempts)
            return None if verdict else False

        token = self.election.term
        try:
            updated = await self._store.update(
                stored.status.task_id, mutate, fence=[self.election.fence()]
            )
        except StaleWrite:
            self._history.write("requeue", "rejected", task=stored.status.task_id, token=token)
            await self._still_leading()
            raise
        if verdict:
            self._history.write(
                "requeue",
                verdict,
                task=updated.status.task_id,
                token=token,
                attempt=updated.status.attempt,
                rev=updated.revision,
                dead=dead_agent,
            )
        if verdict != "requeued":
            if verdict:
                log.info("task %s failed: its agent %s died", updated.status.task_id, dead_agent)
            return
        status = updated.status
        # It keeps its age: should it wait in the backlog, it goes before younger tasks
        # of its class, rather than paying for its agent's death with a second wait.
        job = Job(
            status.spec,
            status.attempt,
            status.deadline.ToMilliseconds(),
            enqueued_ms=status.created_at.ToMilliseconds(),
        )
        log.info("re-queued %s as attempt %d (agent %s died)", job.task_id, job.attempt, dead_agent)
        self._spawn_placement(job)

    # -- placing what was taken ----------------------------------------------------------

    def _spawn_placement(self, job: Job) -> None:
        task = asyncio.create_task(self._placed(job), name=f"place {job.task_id}")
        self._placing.add(task)
        task.add_done_callback(self._placement_done)

    def _placement_done(self, task: asyncio.Task[None]) -> None:
        self._placing.discard(task)
        self._wake.set()  # the view has learnt where it went: look at the backlog again

    async def _placed(self, job: Job) -> None:
        """Place ``job``: on an agent, or back into the backlog with its age kept. etcd
        trouble is retried until the task's deadline, which then fails it: a task taken
        from the backlog is never left without an agent that answers for it."""
        tries = 0
        while job.deadline_ms > now_ms():
            try:
                where = await self._place(job)
                log.info("attempt %d of %s placed on %s", job.attempt, job.task_id, where)
                return
            except (StaleWrite, TaskNotFound) as exc:
                log.info("%s moved on while being placed: %s", job.task_id, exc)
                return
            except MeshError as exc:
                delay = PLACE_RETRY_S[min(tries, len(PLACE_RETRY_S) - 1)]
                tries += 1
                log.warning("placing %s failed (%s); again in %.1fs", job.task_id, exc, delay)
                await asyncio.sleep(delay)
        await self._expire_job(job)

    async def _expire_job(self, job: Job) -> None:
        try:
            await self._store.finish(
                job.task_id,
                pb.TASK_STATE_FAILED,
                "DEADLINE_EXCEEDED",
                "deadline passed while waiting to run again",
                attempt=job.attempt,
            )
        except MeshError as exc:
            log.info("could not end %s: %s", job.task_id, exc)
