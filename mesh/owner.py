"""The DC's queue owner: the one leader in the mesh, elected per DC through etcd.

While it leads, it re-places the work of agents that died: when an agent's membership key
goes (its lease expired: crashed, or paused past the TTL), every task still recorded on
it (queued, or running: its running marker went with the same lease) gets attempt + 1 and
is placed again, or fails with the reason once ``max_attempts`` runs have been tried, or
when its payload was only held by the dead agent. On taking office it also sweeps for
tasks left on agents that are no longer members, which covers deaths while nobody led.

Every re-queue is fenced by the leadership (a deposed owner cannot write), and the bumped
attempt fences the dead agent: should it come back, its late writes are refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from mesh.election import Election
from mesh.errors import MeshError, NoCapacity
from mesh.executor import Job
from mesh.records import Stored, TaskStore
from mesh.reporting import now_ts
from mesh.task import TERMINAL
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

PLACE_RETRY_S = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


class QueueOwner:
    def __init__(
        self,
        election: Election,
        store: TaskStore,
        place: Callable[[Job], Awaitable[str]],
        max_attempts: int,
    ) -> None:
        self.election = election
        self._store = store
        self._place = place
        self._max_attempts = max_attempts
        self._members: frozenset[str] = frozenset()
        self._departed: asyncio.Queue[str] = asyncio.Queue()
        self.leading = False
        self._placing: set[asyncio.Task[None]] = set()

    def members_changed(self, members: Iterable[str]) -> None:
        current = frozenset(members)
        for agent_id in sorted(self._members - current):
            self._departed.put_nowait(agent_id)
        self._members = current

    async def run(self) -> None:
        """Campaign, then lead until cancelled (the agent cancels it when its lease is lost)."""
        term = await self.election.campaign()
        self.leading = True
        log.info("queue owner of the DC", extra={"term": term})
        try:
            await self._sweep(lambda agent: agent not in self._members)
            while True:
                gone = await self._departed.get()
                await self._sweep(lambda agent, gone=gone: agent == gone)
        finally:
            self.leading = False
            for task in list(self._placing):
                task.cancel()

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
                status.state = pb.TASK_STATE_FAILED
                status.finished_at.CopyFrom(now_ts())
                status.error.code = "UNAVAILABLE"
                status.error.message = f"agent {dead_agent} died running it; {why}"
                verdict = "failed"
                return None
            status.attempt += 1
            status.state = pb.TASK_STATE_PENDING
            status.agent = ""
            status.ClearField("progress")
            status.ClearField("started_at")
            verdict = "requeued"
            return None

        updated = await self._store.update(
            stored.status.task_id, mutate, fence=[self.election.fence()]
        )
        if verdict != "requeued":
            if verdict:
                log.info("task %s failed: its agent %s died", updated.status.task_id, dead_agent)
            return
        status = updated.status
        job = Job(status.spec, status.attempt, status.deadline.ToMilliseconds())
        log.info("re-queued %s as attempt %d (agent %s died)", job.task_id, job.attempt, dead_agent)
        task = asyncio.create_task(self._place_until_deadline(job))
        self._placing.add(task)
        task.add_done_callback(self._placing.discard)

    async def _place_until_deadline(self, job: Job) -> None:
        """Place a re-queued task, waiting for capacity while its deadline allows."""
        while True:
            if job.deadline_ms <= now_ms():
                await self._expire(job)
                return
            try:
                where = await self._place(job)
                log.info("attempt %d of %s placed on %s", job.attempt, job.task_id, where)
                return
            except NoCapacity:
                await asyncio.sleep(PLACE_RETRY_S)
            except MeshError as exc:
                log.warning("re-placing %s failed: %s", job.task_id, exc)
                return

    async def _expire(self, job: Job) -> None:
        def mutate(record: peer_pb2.TaskRecord) -> None:
            record.status.state = pb.TASK_STATE_FAILED
            record.status.finished_at.CopyFrom(now_ts())
            record.status.error.code = "DEADLINE_EXCEEDED"
            record.status.error.message = "deadline passed while waiting to run again"

        try:
            await self._store.update(job.task_id, mutate, attempt=job.attempt)
        except MeshError as exc:
            log.info("could not expire %s: %s", job.task_id, exc)
