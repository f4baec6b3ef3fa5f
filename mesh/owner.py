"""The DC's queue owner: the one leader in the mesh, elected per DC through etcd.

While it leads, it dispatches the DC's durable backlog (``mesh.backlog``) as capacity
frees, by class weight and age, and it re-places the work of agents that died: when an
agent's membership key goes (its lease expired: crashed, or paused past the TTL), every
task still recorded on it (queued, or running: its running marker went with the same
lease) gets attempt + 1 and is placed again, or fails with the reason once
``max_attempts`` runs have been tried, or when its payload was only held by the dead
agent. On taking office it also sweeps for tasks left on agents that are no longer
members, which covers deaths while nobody led.

Every re-queue and every dispatch is fenced by the leadership (a deposed owner cannot
write), and the bumped attempt fences the dead agent: should it come back, its late
writes are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from mesh import backlog
from mesh.election import Election
from mesh.errors import MeshError, StaleWrite
from mesh.etcd import ETCD_ERRORS, KeySpace
from mesh.executor import Job
from mesh.history import History
from mesh.mirror import PrefixMirror
from mesh.queue import Discipline
from mesh.records import Stored, TaskStore, end, now_ms
from mesh.task import TERMINAL
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

DISPATCH_TICK_S = 0.5  # capacity frees without the backlog changing: look again this often


class QueueOwner:
    def __init__(
        self,
        election: Election,
        store: TaskStore,
        keys: KeySpace,
        place: Callable[[Job], Awaitable[str]],
        room_for: Callable[[pb.TaskSpec], bool],
        discipline: Discipline,
        max_attempts: int,
        history: History,
    ) -> None:
        """``place`` places a job (into the backlog if nothing can take it); ``room_for``
        says whether the router sees room for a task now. ``history`` hears every term
        and every fenced write with the token it carried."""
        self.election = election
        self._store = store
        self._keys = keys
        self._place = place
        self._room_for = room_for
        self.discipline = discipline
        self._max_attempts = max_attempts
        self._history = history
        self._wake = asyncio.Event()
        self._members: frozenset[str] = frozenset()
        self._departed: asyncio.Queue[str] = asyncio.Queue()
        self._placing: set[asyncio.Task[None]] = set()

    def members_changed(self, members: Iterable[str]) -> None:
        current = frozenset(members)
        for agent_id in sorted(self._members - current):
            self._departed.put_nowait(agent_id)
        self._members = current

    def capacity_changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Campaign, then lead until cancelled (the agent cancels it when its lease is lost).
        etcd trouble on the way makes it stand again, not give up."""
        while True:
            try:
                term = await self.election.campaign()
                log.info("queue owner of the DC", extra={"term": term})
                self._history.write("owner", "elected", token=term)
                async with asyncio.TaskGroup() as duties:  # one fails: both stop
                    duties.create_task(self._recover_orphans())
                    duties.create_task(self._dispatch())
            except* MeshError as trouble:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise asyncio.CancelledError from None  # stopping: errors do not matter
                log.warning("queue owner: %s; standing again", trouble.exceptions[0])
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
        """Move backlog entries to agents while the router sees room, best first."""
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
                await self._dispatch_round(mirror.items)
        finally:
            watching.cancel()

    async def _dispatch_round(self, items: dict[str, bytes]) -> None:
        classes = backlog.by_class(items)
        taken: set[str] = set()
        while True:
            for entries in classes.values():
                entries[:] = [w for w in entries if w.task_id not in taken]
            credit = self.discipline.snapshot()
            waiting = backlog.next_up(classes, self.discipline, now_ms())
            if waiting is None:
                return
            try:
                stored = await self._store.get(waiting.task_id)
            except MeshError:
                await self._claim(waiting)  # its record is gone: drop the entry
                taken.add(waiting.task_id)
                continue
            if stored.record.cancel_requested or stored.status.state in TERMINAL:
                if await self._claim(waiting):
                    taken.add(waiting.task_id)
                    await self._cancelled(stored)
                continue
            if not self._room_for(stored.status.spec):
                self.discipline.restore(credit)  # nothing moved: no credit spent
                return
            if not await self._claim(waiting):
                return
            taken.add(waiting.task_id)
            status = stored.status
            job = Job(
                status.spec,
                status.attempt,
                status.deadline.ToMilliseconds(),
                ["backlog"],
                enqueued_ms=waiting.enqueued_ms,
            )
            self._spawn_placement(job)

    async def _claim(self, waiting: backlog.Waiting) -> bool:
        """Take the entry out of the backlog, if we still lead; False if we do not."""
        key = self._keys.backlog_entry(waiting.queue_class, waiting.enqueued_ms, waiting.task_id)
        client = self._store.client
        tx = client.transactions
        token = self.election.term
        try:
            ok, responses = await client.transaction(
                compare=[self.election.fence(), tx.version(key) > 0],
                success=[tx.delete(key)],
                failure=[],
            )
        except ETCD_ERRORS as exc:
            log.warning("backlog claim failed: %s", exc)
            return False
        revision = responses[0].response_delete_range.header.revision if ok else None
        self._history.write(
            "claim", "ok" if ok else "rejected", task=waiting.task_id, token=token, rev=revision
        )
        return bool(ok)

    async def _sweep(self, dead: Callable[[str], bool]) -> None:
        for stored in await self._store.scan():
            status = stored.status
            if status.state in TERMINAL or stored.record.forwarded_to_dc:
                continue
            if status.agent and dead(status.agent):
                try:
                    await self._requeue(stored)
                except MeshError as exc:
                    log.warning("could not re-queue %s: %s", status.task_id, exc)

    async def _requeue(self, stored: Stored) -> None:
        dead_agent = stored.status.agent
        verdict = ""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal verdict
            status = record.status
            if status.state in TERMINAL or status.agent != dead_agent:
                return False  # it moved on meanwhile
            if record.payload_not_kept or status.attempt >= self._max_attempts:
                why = (
                    "its payload was held only by that agent"
                    if record.payload_not_kept
                    else f"{status.attempt} of {self._max_attempts} attempts used"
                )
                end(
                    status,
                    pb.TASK_STATE_FAILED,
                    "UNAVAILABLE",
                    f"agent {dead_agent} died running it; {why}",
                )
                verdict = "failed"
                return None
            status.attempt += 1
            status.state = pb.TASK_STATE_PENDING
            status.agent = ""
            status.ClearField("progress")
            status.ClearField("started_at")
            verdict = "requeued"
            return None

        token = self.election.term
        try:
            updated = await self._store.update(
                stored.status.task_id, mutate, fence=[self.election.fence()]
            )
        except StaleWrite:
            self._history.write("requeue", "rejected", task=stored.status.task_id, token=token)
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

    def _spawn_placement(self, job: Job) -> None:
        task = asyncio.create_task(self._placed(job))
        self._placing.add(task)
        task.add_done_callback(self._placing.discard)

    async def _placed(self, job: Job) -> None:
        """Place ``job``: on an agent, or back into the backlog with its age kept."""
        if job.deadline_ms <= now_ms():
            await self._expire(job)
            return
        try:
            where = await self._place(job)
            log.info("attempt %d of %s placed on %s", job.attempt, job.task_id, where)
        except MeshError as exc:
            log.warning("placing %s failed: %s", job.task_id, exc)

    async def _cancelled(self, stored: Stored) -> None:
        status = stored.status
        await self._finish(
            status.task_id,
            status.attempt,
            pb.TASK_STATE_CANCELLED,
            "CANCELLED",
            "cancelled while in the backlog",
        )

    async def _expire(self, job: Job) -> None:
        await self._finish(
            job.task_id,
            job.attempt,
            pb.TASK_STATE_FAILED,
            "DEADLINE_EXCEEDED",
            "deadline passed while waiting to run again",
        )

    async def _finish(
        self, task_id: str, attempt: int, state: int, code: str, message: str
    ) -> None:
        try:
            await self._store.finish(task_id, state, code, message, attempt=attempt)
        except MeshError as exc:
            log.info("could not end %s: %s", task_id, exc)
