"""Where tasks arrive: the receiving end of an offer.

A peer of this DC offers a task with the most tasks this agent may hold after taking it
(its bounded-load view); this agent decides by its own live count, which gossip may not
have caught up with, and records the task as its own. A task offered from another DC is
taken into this DC's records and placed here, never onward: overflow is one step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

from mesh import metrics, tracing
from mesh.agent.executor import Executor
from mesh.agent.view import View
from mesh.config import AgentConfig
from mesh.core.clock import now_ms, now_ts
from mesh.core.jobs import Job
from mesh.core.lifecycle import claim_run, new_record
from mesh.core.task import DC_NAME, check_id, check_offer, spec_digest
from mesh.errors import InvalidTask, MeshError, StaleWrite
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

MAX_DEADLINE_MS = 253402300799_000  # 9999-12-31: the last instant a record can hold


class Intake:
    def __init__(
        self,
        cfg: AgentConfig,
        store: TaskStore,
        view: View,
        executor: Executor,
        place: Callable[..., Awaitable[str]],
        known_pipelines: Callable[[], set[str]],
    ) -> None:
        """``place`` is this agent's sending end (``Placement.place``), for tasks taken
        from another DC; ``known_pipelines`` are the pipelines of this DC's agents."""
        self._cfg = cfg
        self._store = store
        self._view = view
        self._executor = executor
        self._place = place
        self._known_pipelines = known_pipelines

    async def offer(self, envelope: peer_pb2.Envelope) -> tuple[bool, str]:
        """Another agent asks us to take a task: decided by our own live load, not gossip.
        Its fields are checked as a Submit's are, before anything is touched."""
        check_offer(envelope, self._cfg, self._known_pipelines(), now_ms())
        if self._cfg.agent_id in envelope.path:
            return False, "loop: already visited"
        if envelope.hops > self._view.max_hops:
            return False, "hop limit"
        if not 0 < envelope.deadline_unix_ms <= MAX_DEADLINE_MS:
            raise InvalidTask("deadline out of range", deadline_unix_ms=envelope.deadline_unix_ms)
        job = Job(
            envelope.spec,
            envelope.attempt,
            envelope.deadline_unix_ms,
            list(envelope.path),
            traceparent=tracing.checked(envelope.traceparent),  # stored: only if well formed
        )
        if envelope.origin_dc and envelope.origin_dc != self._cfg.dc:
            accepted, reason = await self._adopt(job)
        else:
            accepted, reason = await self.accept(job, envelope.max_tasks, envelope.reclaim)
        metrics.OFFERS.labels("accepted" if accepted else "refused").inc()
        return accepted, reason

    async def _adopt(self, job: Job) -> tuple[bool, str]:
        """Take a task from another DC into this one: record it here and place it here
        (never onward to a third DC: overflow is one step)."""
        if job.deadline_ms <= now_ms():
            return False, "deadline passed"
        digest = spec_digest(job.spec)
        record = new_record(
            job.spec,
            digest,
            job.deadline_ms,
            attempt=job.attempt,
            path=job.path,
            agent_id=self._cfg.agent_id,
            dc=self._cfg.dc,
            inline_payload_bytes=self._cfg.inline_payload_bytes,
            traceparent=job.traceparent,
            trace_id=tracing.trace_id(job.traceparent),
        )
        stored, created = await self._store.create(record)
        if not created:
            if held := stored.record.forwarded_to_dc or stored.record.superseded_by_dc:
                # It left this DC once, a settle decided it stays in its origin, or this
                # DC's copy of the id lost to that DC's (and was cancelled): taking it
                # would leave two records answering for it, each pointing to the other.
                return False, f"it belongs to DC {held}"
            if stored.record.spec_digest != digest:
                return False, "task id already used here by another task"
            return True, "already here"
        try:
            where = await self._place(job, spill=False, wait=False)
        except MeshError as exc:
            with contextlib.suppress(MeshError):
                await self._store.delete(stored)
            return False, f"{self._cfg.dc} is full too: {exc.message}"
        log.info("took %s from DC %s, placed on %s", job.task_id, job.path[0], where)
        return True, "accepted"

    async def settle(self, request: peer_pb2.SettleRequest) -> peer_pb2.SettleResponse:
        """The origin DC does not know whether its offer of a task reached us (it timed
        out, or the offering agent died). Answer from our record; with none, record that
        the task stays in its origin, in the same create-if-absent transaction a late
        offer would need, so that offer can never be adopted afterwards."""
        outcome = peer_pb2.SettleResponse
        check_id(request.task_id)
        if not DC_NAME.fullmatch(request.origin_dc) or request.origin_dc == self._cfg.dc:
            raise InvalidTask("origin_dc must name another DC")
        stored, created = await self._store.create(pointer(request.task_id, request.origin_dc))
        if created or stored.record.forwarded_to_dc == request.origin_dc:
            return outcome(outcome=outcome.OUTCOME_NOT_HELD)
        if stored.status.state == pb.TASK_STATE_PENDING:
            return outcome(outcome=outcome.OUTCOME_IN_PROGRESS)  # being adopted or placed
        return outcome(outcome=outcome.OUTCOME_HELD)

    async def accept(self, job: Job, max_tasks: float, reclaim: bool = False) -> tuple[bool, str]:
        """Queue ``job`` here if our live load allows: within ``max_tasks`` running and
        queued after it, or (0) within our hard limit, slots plus queue length; past it
        when asked to ``reclaim`` and borrowed batch runs here will give their GPUs."""
        if job.deadline_ms <= now_ms():
            return False, "deadline passed"
        reclaiming = reclaim and self._executor.can_reclaim(job.spec)
        try:
            self._executor.check(job.spec, past_bound=reclaiming)
        except MeshError as exc:
            return False, exc.message
        tasks = self._executor.running + self._executor.queued
        limit = max_tasks or self._executor.slots + self._cfg.max_queue_length
        if tasks + 1 > limit and not reclaiming:
            return False, f"over the bound ({tasks + 1} > {limit:g} tasks)"
        # Enqueue before any await, so the check above still holds; the record follows.
        self._executor.enqueue(job, past_bound=reclaiming)
        wait_s = self._executor.expected_start_s(job.task_id)  # as it stands now, once

        digest = spec_digest(job.spec)

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            if record.spec_digest and record.spec_digest != digest:
                raise InvalidTask("the offered spec is not the recorded one")
            status = record.status
            claim_run(record, self._cfg.agent_id)
            status.dc = self._cfg.dc
            del status.path[:]
            status.path.extend(job.path)
            if status.state == pb.TASK_STATE_PENDING:
                status.state = pb.TASK_STATE_QUEUED
                status.queued_at.CopyFrom(now_ts())
            status.ClearField("expected_start")
            if wait_s is not None:
                status.expected_start.FromMilliseconds(now_ms() + int(wait_s * 1000))
            return None

        try:
            await self._store.update(job.task_id, mutate, attempt=job.attempt)
        except MeshError as exc:
            if isinstance(exc, StaleWrite) and await self._runs_here(job):
                return True, "accepted"
            # Not ours: out of the queue, and a run whose start is in flight is left to
            # its start write, which the record refuses too. Cancelling that run instead
            # would write its end over the record of the agent that runs the task.
            self._executor.withdraw(job.task_id)
            return False, f"record: {exc.message}"
        return True, "accepted"

    async def _runs_here(self, job: Job) -> bool:
        """Whether the record shows this agent running (or having run) ``job``'s attempt:
        a short task can start, even finish, before the accepting write lands."""
        try:
            status = (await self._store.get(job.task_id)).status
        except MeshError:
            return False
        return status.agent == self._cfg.agent_id and status.attempt == job.attempt


def pointer(task_id: str, dc: str) -> peer_pb2.TaskRecord:
    """A record that only says the task lives in DC ``dc``."""
    status = pb.TaskStatus(task_id=task_id, state=pb.TASK_STATE_PENDING, dc=dc)
    status.created_at.CopyFrom(now_ts())
    return peer_pb2.TaskRecord(status=status, forwarded_to_dc=dc)
