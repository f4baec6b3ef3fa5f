"""Giving work back: the tasks an agent will not finish (it is stopping, or it lost its
lease) go to its peers, or fail with the reason if none takes them.

An interrupted run becomes a new attempt (its writes are fenced from then on); a queued
one keeps its attempt. Until a peer takes a task, its record names this agent (pending),
so should the agent die first, the DC's owner finds it among the dead agent's tasks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from mesh import metrics
from mesh.agent.history import History
from mesh.agent.placement import Placement
from mesh.core.jobs import Job
from mesh.core.lifecycle import requeue, requeued_job
from mesh.core.task import TERMINAL
from mesh.errors import MeshError, StaleWrite, Unavailable
from mesh.store.dc import DcStore
from mesh.store.records import Stored
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


class Leftovers(NamedTuple):
    jobs: list[Job]  # re-queued: to place
    handoffs: list[Stored]  # hand-offs to other DCs in doubt: to settle


class Handover:
    def __init__(
        self,
        agent_id: str,
        store: DcStore,
        placement: Placement,
        history: History,
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
    ) -> None:
        """``spawn`` runs background work the agent cancels when it stops."""
        self._me = agent_id
        self._store = store.records
        self._count_preemption = store.count_preemption
        self._placement = placement
        self._history = history
        self._spawn = spawn

    def preempted(self, job: Job) -> None:
        """A batch run gave its GPUs to online work and has stopped: hand its task back."""
        metrics.PREEMPTED.labels(job.spec.user.group or metrics.NO_GROUP).inc()
        self._spawn(f"preempted {job.task_id}", self.give_back(job, preempted=True))

    async def release_leftovers(self, max_attempts: int) -> Leftovers:
        """Tasks an earlier run of this agent left under way: their runs died with it.

        An agent restarted under the same id before the DC's owner saw it die (the owner
        died too, say) is a member again at once, so no owner will ever write those
        tasks off. This run does, before it takes any work (anything under its name now
        is its predecessor's), as the owner would have: a new attempt, or failed after
        ``max_attempts``. Returns the jobs to place, and the hand-offs to other DCs it
        left in doubt, which ``settle_leftover`` decides."""
        leftovers = Leftovers([], [])
        for stored in await self._store.scan():
            status = stored.status
            if status.agent != self._me or status.state in TERMINAL:
                continue
            if stored.record.forwarded_to_dc:
                leftovers.handoffs.append(stored)
            elif job := await self._requeue_mine(stored, max_attempts):
                leftovers.jobs.append(job)
        return leftovers

    async def settle_leftover(self, stored: Stored, max_attempts: int) -> None:
        """A hand-off to another DC that an earlier run of this agent left in doubt is
        decided with that DC, as the owner decides a dead agent's: pointed there if it
        holds the task, else taken back as a new attempt and placed here."""

        async def take_back(stored: Stored) -> None:
            if job := await self._requeue_mine(stored, max_attempts, reclaim=True):
                await self.place_leftover(job)

        await self._placement.handoffs.decide(stored, (), take_back)

    async def place_leftover(self, job: Job) -> None:
        """Place a task taken back from an earlier run of this agent, or fail it."""
        try:
            await self._placement.place(job, patient=True)
        except MeshError as exc:
            await self._placement.fail(job, exc.code, f"could not be placed again: {exc.message}")

    async def _requeue_mine(
        self, stored: Stored, max_attempts: int, reclaim: bool = False
    ) -> Job | None:
        """Write off this agent's earlier run of ``stored``'s task (``reclaim``: and take
        back a hand-off the other DC does not hold); the job to place, if re-queued."""
        me, task_id = self._me, stored.status.task_id
        verdict = ""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal verdict
            if reclaim:
                record.forwarded_to_dc = ""
                record.status.dc = self._placement.cfg.dc
            verdict = requeue(record, me, max_attempts)
            return None if verdict else False

        updated = await self._store.update(task_id, mutate)
        if not verdict:
            return None
        attempt = updated.status.attempt
        self._history.write("requeue", verdict, task=task_id, attempt=attempt, dead=me)
        log.info("a task my previous run left %s: %s", verdict, task_id)
        if verdict != "requeued":
            return None
        return requeued_job(updated.status, updated.record.traceparent)

    async def give_back(
        self, job: Job, *, after_loss: bool = False, preempted: bool = False
    ) -> None:
        """Give a job this agent will not finish to a peer; fail it if none takes it.

        Until a peer takes it, its record names this agent (pending): should this agent
        die first, the DC's owner finds it among the dead agent's tasks. A job whose
        record has moved on (another attempt, or with ``after_loss`` another agent) is
        someone else's now and is left alone. A ``preempted`` one is counted on its
        record and placed like any other (here again, if this agent has room first).
        """
        me = self._me
        interrupted = False
        moved_on = False

        def reset(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal interrupted, moved_on
            status = record.status
            if status.state in TERMINAL or (after_loss and status.agent != me):
                moved_on = True
                return False
            held = self._placement.executor.holding(job.task_id)
            if after_loss and held is not None and held is not job:
                # Taken here again under the new lease: handing it back would run it twice.
                moved_on = True
                return False
            interrupted = status.state == pb.TASK_STATE_RUNNING
            if preempted:
                status.preemptions += 1
                status.progress.CopyFrom(pb.Progress(message="preempted by online work"))
            status.state = pb.TASK_STATE_PENDING
            status.agent = me
            if interrupted:
                status.attempt += 1
            return None

        try:
            await self._store.update(job.task_id, reset, attempt=job.attempt)
        except StaleWrite:
            return
        except MeshError as exc:
            log.warning("could not hand back %s: %s", job.task_id, exc)
            return
        if moved_on:
            return
        if preempted and (group := job.spec.user.group):
            with contextlib.suppress(Unavailable):  # a count for people, not a guarantee
                await self._count_preemption(group)
        if interrupted:
            job.attempt += 1
        job.path = [*job.path, me]
        try:
            where = await self._placement.place(job)
            log.info("handed back %s", job.task_id)
            how = "preempted" if preempted else "ok"
            self._history.write("handback", how, task=job.task_id, attempt=job.attempt, to=where)
        except MeshError as exc:
            log.warning("could not hand back %s: %s", job.task_id, exc)
            await self._placement.fail(job, "UNAVAILABLE", f"agent {me} shut down: {exc}")
