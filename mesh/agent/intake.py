"""Where tasks arrive: the receiving end of an offer.

A peer of this DC offers a task with the most tasks this agent may hold after taking it
(its bounded-load view); this agent decides by its own live count (``acceptance``). A
task offered from another DC is taken into this DC's records and placed here, never
onward: overflow is one step; an origin DC unsure of its offer settles it here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mesh import metrics, tracing
from mesh.agent.acceptance import Acceptance
from mesh.agent.retry import patient
from mesh.agent.view import View
from mesh.config import AgentConfig
from mesh.core.clock import now_ms, now_ts
from mesh.core.jobs import Job
from mesh.core.lifecycle import new_record
from mesh.core.task import DC_NAME, check_id, check_offer, spec_digest
from mesh.errors import InvalidTask, MeshError, TaskNotFound, Unavailable, Unsure
from mesh.store.records import Stored, TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

MAX_DEADLINE_MS = 253402300799_000  # 9999-12-31: the last instant a record can hold
TAKE_BACK_TRIES = 3  # an adopted record that changes under each delete is not taken back


class Intake:
    def __init__(
        self,
        cfg: AgentConfig,
        store: TaskStore,
        view: View,
        acceptance: Acceptance,
        place: Callable[..., Awaitable[str]],
        known_pipelines: Callable[[], set[str]],
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
        patience_s: float,
    ) -> None:
        """``place`` is this agent's sending end (``Placement.place``), for tasks taken
        from another DC; ``known_pipelines`` are the pipelines of this DC's agents."""
        self._cfg = cfg
        self._store = store
        self._view = view
        self._acceptance = acceptance
        self._place = place
        self._known_pipelines = known_pipelines
        self._spawn = spawn
        self._patience_s = patience_s  # how long a write waits out an etcd outage

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
            waited_s=envelope.waited_s,
        )
        if envelope.origin_dc and envelope.origin_dc != self._cfg.dc:
            accepted, reason = await self._adopt(job)
        else:
            accepted, reason = await self._acceptance.accept(
                job, envelope.max_tasks, envelope.reclaim
            )
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
        try:
            stored, created = await self._store.create(record)
        except Unsure:
            # It may be recorded here, PENDING under this agent's name, while the offering
            # DC hears it was not: once etcd answers, place what was written.
            self._spawn(f"settle {job.task_id}", self._settle(job, digest))
            raise
        if not created:
            if held := stored.record.forwarded_to_dc or stored.record.superseded_by_dc:
                # It left this DC once, a settle decided it stays in its origin, or this
                # DC's copy of the id lost to that DC's (and was cancelled): taking it
                # would leave two records answering for it, each pointing to the other.
                return False, f"it belongs to DC {held}"
            if stored.record.spec_digest != digest:
                return False, "task id already used here by another task"
            if stored.status.state == pb.TASK_STATE_PENDING:
                # Another offer of it is being adopted here right now (its answer was
                # late, and the offering DC tried another seed), and may yet be taken
                # back: only a settle can tell the offering DC how that ends (seed 873).
                raise Unavailable("being placed here: settle", task_id=job.task_id)
            return True, "already here"
        try:
            where = await self._place(job, spill=False, wait=False)
        except MeshError as exc:
            try:
                taken_back = await self._take_back(stored)
            except MeshError as kept:
                # Neither placed nor taken back, the record is this DC's task now: it is
                # placed once etcd answers (never left PENDING, which a settle would read
                # as "being placed" for ever), and the offering DC, told nothing sure,
                # settles.
                log.warning("%s adopted but not placed (%s): placing it later", job.task_id, exc)
                self._spawn(f"settle {job.task_id}", self._settle(job, digest))
                raise Unavailable(f"adopted, not yet placed: {kept.message}") from exc
            if not taken_back:
                log.info("took %s from DC %s, placed after all", job.task_id, job.path[0])
                return True, "accepted"
            return False, f"{self._cfg.dc} is full too: {exc.message}"
        log.info("took %s from DC %s, placed on %s", job.task_id, job.path[0], where)
        return True, "accepted"

    async def _take_back(self, stored: Stored) -> bool:
        """Delete an adopted record that could not be placed; False if it is no longer
        ours to take back: an agent of this DC took it (an offer whose answer was lost
        landed after all), or a cancel was asked for meanwhile (answered from this
        record, so the task ends here, as asked, rather than run in its origin)."""
        task_id = stored.status.task_id
        for _ in range(TAKE_BACK_TRIES):
            if await self._store.delete(stored):
                return True
            try:
                stored = await self._store.get(task_id)
            except TaskNotFound:
                return True
            status = stored.status
            if status.state != pb.TASK_STATE_PENDING or status.agent != self._cfg.agent_id:
                return False
            if stored.record.cancel_requested:
                why = stored.record.cancel_reason or "cancelled while being placed"
                await self._store.finish(task_id, pb.TASK_STATE_CANCELLED, "CANCELLED", why)
                return False
        raise Unavailable(f"the record of {task_id} keeps changing; not taken back")

    async def _settle(self, job: Job, digest: str) -> None:
        """Place a task whose adoption's record write was unsure (or which could be
        neither placed nor taken back), if it was written and nobody took it up since; a
        written record nobody places would be PENDING for ever. The DC's backlog holds
        it if no agent has room: the task is this DC's by now."""
        try:
            stored = await patient(self._patience_s).run(lambda: self._store.get(job.task_id))
        except MeshError:
            return  # never written, or etcd never came back: nothing here to place
        status = stored.status
        mine = status.agent == self._cfg.agent_id and stored.record.spec_digest == digest
        if status.state != pb.TASK_STATE_PENDING or not mine:
            return
        try:
            await self._place(job, spill=False, wait=True)
        except MeshError as exc:
            log.warning("could not place %s, adopted unsure: %s", job.task_id, exc)
            with contextlib.suppress(MeshError):
                await self._store.delete(stored)

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
        record = stored.record
        if created or request.origin_dc in (record.forwarded_to_dc, record.superseded_by_dc):
            # None here, a pointer back, or a copy here that lost the id to the origin's
            # and was cancelled for it (seed 118): the task is the origin's.
            return outcome(outcome=outcome.OUTCOME_NOT_HELD)
        if stored.status.state == pb.TASK_STATE_PENDING:
            return outcome(outcome=outcome.OUTCOME_IN_PROGRESS)  # being adopted or placed
        return outcome(outcome=outcome.OUTCOME_HELD)


def pointer(task_id: str, dc: str) -> peer_pb2.TaskRecord:
    """A record that only says the task lives in DC ``dc``."""
    status = pb.TaskStatus(task_id=task_id, state=pb.TASK_STATE_PENDING, dc=dc)
    status.created_at.CopyFrom(now_ts())
    return peer_pb2.TaskRecord(status=status, forwarded_to_dc=dc)
