"""Submit: claim the id, record the task, then place it — one step, since a record that
nobody places is a lost task.

The id is claimed first, mesh-wide, in its home DC (``mesh.agent.addressing``): when
another DC holds it, that DC's task is the answer. The record is created only if its id
is new (an idempotent Submit returns the first task). If placing fails, the record is
deleted again: nothing was accepted. When the write timed out and may have happened, the
client is told ``UNAVAILABLE`` and this agent places the task once etcd shows it was
recorded. When the DC's etcd refuses the record (no leader, no member reachable), the
write is tried again for about as long as an election takes: the client's retry of an
unsure Submit lands here, and the earlier write may yet be applied, so only a create that
reads the id back as absent tells the truth. An etcd still refusing after that sends the
task to the topology's overflow DCs, which record and run it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from mesh import metrics, tracing
from mesh.agent.addressing import Addressing
from mesh.agent.placement import Placement
from mesh.agent.retry import patient
from mesh.config import AgentConfig
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.core.lifecycle import being_placed, new_record
from mesh.core.task import Admitted
from mesh.errors import MeshError, StaleWrite, Unavailable, Unsure
from mesh.store.claims import Claim
from mesh.store.records import Stored, TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


class Submission:
    def __init__(
        self,
        cfg: AgentConfig,
        store: TaskStore,
        placement: Placement,
        addressing: Addressing,
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
    ) -> None:
        """``spawn`` runs background work the agent cancels when it stops."""
        self._cfg = cfg
        self._store = store
        self._placement = placement
        self._addressing = addressing
        self._spawn = spawn
        self._settling: set[str] = set()  # ids whose unsure Submit is being settled

    async def _offer_unrecorded(self, dc: str, job: Job) -> tuple[bool, str]:
        """Offer a task we could not record: an answer lost on the way is the client's to
        retry (with the same id, the other DC answers "already here")."""
        try:
            reply = await self._placement.remote.offer(dc, self._placement.dc_envelope(job))
        except MeshError as exc:
            return False, f"unreachable ({exc})"
        return reply.accepted, reply.reason

    def _record(self, admitted: Admitted) -> peer_pb2.TaskRecord:
        return new_record(
            admitted.spec,
            admitted.digest,
            admitted.deadline_ms,
            attempt=1,
            path=(),
            agent_id=self._cfg.agent_id,
            dc=self._cfg.dc,
            inline_payload_bytes=self._cfg.inline_payload_bytes,
            traceparent=(parent := tracing.traceparent()),
            trace_id=tracing.trace_id(parent),
        )

    async def submit(self, admitted: Admitted) -> tuple[Stored, bool]:
        record = self._record(admitted)
        try:
            stored = await self._record_and_claim(record, admitted)
        except Unsure:
            self._settle_soon(admitted)
            raise
        if stored is None:
            return await self._claim_then_record(record, admitted)
        return await self._place_new(stored, admitted), True

    async def _record_and_claim(
        self, record: peer_pb2.TaskRecord, admitted: Admitted
    ) -> Stored | None:
        """An id homed in this DC is claimed in the write that records its task: one
        round trip for both. None when the id is claimed or recorded already, or etcd
        refused the write (nothing was written): ``_claim_then_record`` finds out which."""
        task_id = admitted.spec.task_id
        if self._addressing.home(task_id) != self._cfg.dc:
            return None
        claim = Claim(self._cfg.dc, admitted.digest, now_ms())
        try:
            given, put = await self._addressing.claims.unheld(task_id, claim)
            return await self._store.create_if(record, [given], [put])
        except Unsure:
            raise
        except MeshError:
            return None

    async def _claim_then_record(
        self, record: peer_pb2.TaskRecord, admitted: Admitted
    ) -> tuple[Stored, bool]:
        """Claim the id in its home DC, then record the task here (or answer with the
        task of the DC that holds the id)."""
        spec = admitted.spec
        claimed = await self._addressing.claim(spec.task_id, admitted.digest)
        if claimed.elsewhere is not None:  # another DC holds the id: its task answers
            assert claimed.claim is not None
            if claimed.claim.digest == admitted.digest and being_placed(claimed.elsewhere):
                raise Unavailable(
                    f"task {spec.task_id} is being placed in DC {claimed.claim.dc}: retry"
                )
            held = peer_pb2.TaskRecord(spec_digest=claimed.claim.digest)
            held.status.CopyFrom(claimed.elsewhere)
            return Stored(held, 0), False
        unclaimed = [] if claimed.claim else [self._addressing.claims.mark_unclaimed(spec.task_id)]
        try:
            stored, created = await self._create(record, unclaimed)
        except Unsure:
            self._settle_soon(admitted)
            raise
        except Unavailable as trouble:
            return await self._submit_elsewhere(record, admitted, trouble), True
        if not created:
            return self._existing(stored, admitted), False
        return await self._place_new(stored, admitted), True

    async def _place_new(self, stored: Stored, admitted: Admitted) -> Stored:
        """Place the task just recorded as ``stored``; its record, as placed, answers."""
        spec = admitted.spec
        try:
            job = Job(spec, 1, admitted.deadline_ms, traceparent=stored.record.traceparent)
            where = await self._placement.place(job)
        except StaleWrite:
            # The record moved on while this placed it: the owner re-queued it as another
            # attempt (this agent was paused past its lease), or an offer whose answer was
            # lost took it. It is in the mesh: the answer is its record, never an error
            # that would tell the client it was refused (seed 59).
            where = ""
        except MeshError:
            # Never accepted: leave no trace. Should the delete fail too (etcd away), the
            # record may already answer a retry of the same id ("existing"), so it is not
            # deleted later behind that client's back: it is placed once etcd answers,
            # as a Submit whose record write was unsure is (or failed, if it cannot be).
            try:
                await self._store.delete(stored)
            except MeshError:
                self._settle_soon(admitted)
            raise
        metrics.SUBMITTED.inc()
        if where == self._cfg.agent_id and (mine := self._store.known(spec.task_id)):
            return mine  # taken here: its record is the one this agent last wrote
        try:
            return await self._store.get(spec.task_id)
        except MeshError:
            # Accepted and placed: the answer says so though etcd went away before the read
            # back (a client told UNAVAILABLE would submit again through another DC, which,
            # should this DC's etcd hold the id's claim, records a second task for it).
            return stored

    def _existing(self, stored: Stored, admitted: Admitted) -> Stored:
        """The answer when the id is recorded here already."""
        task_id, record = admitted.spec.task_id, stored.record
        if record.forwarded_to_dc and not record.spec_digest:
            # Only a pointer (a settle of the other DC's unsure offer left it): the task
            # lives there, and its digest with it; a retry there gets the answer. Read as
            # a record, its missing digest said "another task" (seed 6).
            raise Unavailable(f"task {task_id} lives in DC {record.forwarded_to_dc}: retry")
        if record.spec_digest == admitted.digest and being_placed(stored.status):
            # A twin Submit, or an adoption, whose placement may yet fail and take the
            # record back: a retry gets the answer once it is placed (seed 737).
            raise Unavailable(f"task {task_id} is being placed: retry")
        return stored

    def _settle_soon(self, admitted: Admitted) -> None:
        """Place the task once etcd answers, if its record is written and nobody took it
        up since (one settle per id: two would place it twice)."""
        task_id = admitted.spec.task_id
        if task_id not in self._settling:
            self._settling.add(task_id)
            self._spawn(f"settle {task_id}", self._settle_unsure(admitted))

    async def _create(
        self, record: peer_pb2.TaskRecord, also: Sequence[object]
    ) -> tuple[Stored, bool]:
        """Create the record; one etcd refused is tried again (see the module's note) and
        an unsure answer is not: it is settled."""
        try:
            return await self._store.create(record, also=also)
        except Unsure:
            raise
        except Unavailable as refused:
            log.warning(
                "etcd refused the record of %s (%s): trying again before it leaves the DC",
                record.status.task_id,
                refused.message,
            )
        retries = patient(self._cfg.etcd_refused_retry_s, step_s=0.5, final=(Unsure,))
        return await retries.run(lambda: self._store.create(record, also=also))

    async def _settle_unsure(self, admitted: Admitted) -> None:
        """Our record may be written though the Submit failed (etcd applied it once
        quorum was back, or it could not be taken back): when etcd answers, place the
        task if it is still ours to place. The client, told UNAVAILABLE, finds it by its
        id when it retries."""
        spec = admitted.spec
        try:
            await self._settle(admitted)
        finally:
            self._settling.discard(spec.task_id)

    async def _settle(self, admitted: Admitted) -> None:
        spec = admitted.spec
        try:
            stored = await patient(self._cfg.lease_ttl_s + self._cfg.etcd_outage_grace_s).run(
                lambda: self._store.get(spec.task_id)
            )
        except MeshError:
            return  # not written (or etcd never came back): nothing to place
        status = stored.status
        if (
            status.state != pb.TASK_STATE_PENDING
            or status.agent != self._cfg.agent_id
            or stored.record.spec_digest != admitted.digest
        ):
            return
        log.info("a submit that timed out was recorded after all: placing %s", spec.task_id)
        job = Job(spec, status.attempt, admitted.deadline_ms, traceparent=stored.record.traceparent)
        if dc := stored.record.forwarded_to_dc:  # a hand-off of it is in doubt: that DC says
            await self._placement.handoffs.settle_later(dc, job)
            return
        try:
            await self._placement.place(job)
        except MeshError as exc:
            await self._placement.fail(job, exc.code, f"could not be placed: {exc.message}")

    async def _submit_elsewhere(
        self, record: peer_pb2.TaskRecord, admitted: Admitted, trouble: Unavailable
    ) -> Stored:
        """Our DC's etcd cannot take the task: hand it to the overflow DCs, in the
        topology's order of weight, which record and run it (an idempotent hand-over: a
        retry finds it there). Nothing is recorded here, so only they can answer for it."""
        job = Job(admitted.spec, 1, admitted.deadline_ms, traceparent=record.traceparent)
        refused = []
        for overflow in sorted(self._placement.view.overflow, key=lambda o: -o.weight):
            accepted, reason = await self._offer_unrecorded(overflow.dc, job)
            if accepted:
                log.info("etcd down: %s went to DC %s", job.task_id, overflow.dc)
                record.forwarded_to_dc = record.status.dc = overflow.dc
                return Stored(record, 0)
            refused.append(f"{overflow.dc}: {reason}")
        raise Unavailable(
            f"{trouble.message}; no overflow DC took the task",
            task_id=job.task_id,
            **({"refused": "; ".join(refused)} if refused else {}),
        )
