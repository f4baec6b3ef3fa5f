"""Where tasks go, seen from both ends of an offer.

The sending end asks the pure ``Router`` for targets and offers the task to each in turn:
agents of this DC first, then (with the replies' fresher loads) a second decision that
may hand it to another DC or leave it in the DC's durable backlog. The receiving end
checks its own live load against the bound the offer carries, or, for a task from
another DC, takes it into this DC's records.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

import grpc

from mesh import metrics
from mesh.agent.decisionlog import DecisionLog
from mesh.agent.executor import Executor
from mesh.agent.peers import PeerClients
from mesh.agent.remote import RemoteDcs
from mesh.agent.view import View
from mesh.config import AgentConfig
from mesh.core import backlog, summaries
from mesh.core.backlog import Room
from mesh.core.clock import now_ms, now_ts
from mesh.core.jobs import Job
from mesh.core.lifecycle import new_record
from mesh.core.router import (
    AGENT,
    BACKLOG,
    DC,
    NO_SPILL,
    NONE_ELIGIBLE,
    Decision,
    Request,
    Spill,
)
from mesh.core.task import spec_digest
from mesh.errors import InvalidTask, MeshError, NoCapacity, StaleWrite, Unavailable
from mesh.store.keys import KeySpace
from mesh.store.records import TaskStore
from mesh.store.registry import Registry
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

OFFER_TIMEOUT_S = 2.0
MAX_DEADLINE_MS = 253402300799_000  # 9999-12-31: the last instant a record can hold


class Placement:
    def __init__(
        self,
        cfg: AgentConfig,
        keys: KeySpace,
        store: TaskStore,
        view: View,
        registry: Registry,
        peers: PeerClients,
        remote: RemoteDcs,
        executor: Executor,
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
        other_dcs: Callable[[], Mapping[str, peer_pb2.DcSummary]],
    ) -> None:
        """``view`` is the router's view of the DC and the applied topology's overflow;
        ``spawn`` runs background work the agent cancels when it stops; ``other_dcs``
        gives the other DCs' summaries as last heard. Of ``cfg``, only the identity and
        the limits are read (the agent swaps its queues on a new topology)."""
        self.cfg = cfg
        self.keys = keys
        self.store = store
        self.view = view
        self.router = view.router
        self.registry = registry
        self.peers = peers
        self.remote = remote
        self.executor = executor
        self._spawn = spawn
        self._summaries = other_dcs
        self.decisions = DecisionLog(cfg.decision_log) if cfg.decision_log else None

    def close(self) -> None:
        if self.decisions is not None:
            self.decisions.close()

    # -- the overflow DCs -----------------------------------

    def spill(self) -> Spill:
        fresh = summaries.fresh(self._summaries(), now_ms())
        self.remote.set_live({dc: list(s.live) for dc, s in fresh.items()})
        view = self.view
        return Spill(view.overflow, view.spill_share.allowed(), summaries.full(fresh))

    # -- the sending end -------------------------------------------------------------------

    def route(
        self,
        spec: pb.TaskSpec,
        visited: Iterable[str] = (),
        explain: bool = False,
        spill: bool = True,
    ) -> Decision:
        """What the router decides for ``spec`` now; every decision goes to the log."""
        request = request_of(spec)
        options = self.spill() if spill else NO_SPILL
        decision = self.router.route(request, visited, options, explain=explain)
        if self.decisions is not None and not explain:
            self.decisions.write(self.router, request, visited, options, decision)
        return decision

    def room_for(self, spec: pb.TaskSpec) -> Room:
        """Whether an agent of this DC could take ``spec`` now (the backlog waits for
        local room: other DCs were tried before the task went into it)."""
        first = self.router.route(request_of(spec)).first
        if first is NONE_ELIGIBLE:
            return Room.NOT_HERE
        return Room.FULL if first.kind == BACKLOG else Room.FREE

    async def _to_backlog(self, job: Job) -> None:
        """Wait in the DC's durable backlog: the record and the entry in one transaction."""
        enqueued = job.enqueued_ms or now_ms()
        entry = self.keys.backlog_entry(job.spec.queue, enqueued, job.task_id)

        def mutate(record: peer_pb2.TaskRecord) -> None:
            status = record.status
            status.state, status.agent, status.dc = pb.TASK_STATE_QUEUED, "", self.cfg.dc
            del status.path[:]
            status.path.extend(job.path)
            status.queued_at.CopyFrom(now_ts())

        put = self.store.client.transactions.put(entry, backlog.entry_value(job.deadline_ms))
        await self.store.update(job.task_id, mutate, attempt=job.attempt, also=[put])
        metrics.BACKLOGGED.inc()

    async def place(
        self, job: Job, spill: bool = True, wait: bool = True, patient: bool = False
    ) -> str:
        """Offer ``job`` to the router's targets in turn until one takes it.

        A first round offers only to agents of this DC. If all refuse, their replies have
        refreshed the view, so a second decision is made with them marked visited, and
        only that one may spill to other DCs or end in the backlog: the DC's durable
        backlog when ``wait`` allows and the payload is kept in the record, else
        ``NoCapacity``. A new task that no agent of the DC can run is refused; a
        ``patient`` one (the owner's: it was accepted long ago) waits in the backlog
        for such an agent until its deadline.
        """
        visited = set(job.path)
        refused: list[str] = []
        for final in (False, True):
            decision = self.route(job.spec, visited, spill=spill)
            for target in decision.targets:
                if target.kind == AGENT:
                    accepted, reason = await self._offer_agent(target.name, target.max_tasks, job)
                    if accepted:
                        self.view.spill_share.record(False)
                        return target.name
                    visited.add(target.name)
                    refused.append(f"{target.name}: {reason}")
                elif not final:
                    break
                elif target.kind == DC:
                    accepted, reason = await self.offer_dc(target.name, job)
                    if accepted:
                        self.view.spill_share.record(True)
                        return f"dc:{target.name}"
                    refused.append(f"dc {target.name}: {reason}")
                elif wait and self._durable(job) and (patient or target is not NONE_ELIGIBLE):
                    await self._to_backlog(job)
                    self.view.spill_share.record(False)
                    return "backlog"
                else:
                    details = {"refused": "; ".join(refused[-4:])} if refused else {}
                    raise NoCapacity(
                        target.reason.removeprefix("backlog: "),
                        task_id=job.task_id,
                        retry_after_s=1,
                        **details,
                    )
        raise AssertionError("a decision always ends in the backlog")

    def _durable(self, job: Job) -> bool:
        return len(job.spec.payload) <= self.cfg.inline_payload_bytes

    async def _offer_agent(self, agent_id: str, max_tasks: float, job: Job) -> tuple[bool, str]:
        if agent_id == self.cfg.agent_id:
            return await self.accept(job, max_tasks)
        peer = self.registry.peers.get(agent_id)
        if peer is None:
            return False, "not a member now"
        if len(job.path) + 1 > self.view.max_hops:
            return False, "hop limit"
        envelope = self._envelope(job, max_tasks)
        try:
            reply = await self.peers.offer(peer.address, envelope, self._offer_timeout(job))
        except grpc.aio.AioRpcError as exc:
            metrics.FORWARDS.labels("error").inc()
            self.router.set_suspect(agent_id, True)
            return False, f"unreachable ({exc.code().name})"
        self.view.learn(agent_id, reply.load, reply.accepted)
        metrics.FORWARDS.labels("accepted" if reply.accepted else "refused").inc()
        return reply.accepted, reply.reason

    async def offer_dc(self, dc: str, job: Job) -> tuple[bool, str]:
        """Hand ``job`` to DC ``dc``: its record moves there, ours points to it."""
        if len(job.path) + 1 > self.view.max_hops:
            return False, "hop limit"
        envelope = self._envelope(job, 0.0)
        envelope.origin_dc = self.cfg.dc
        try:
            reply = await self.remote.offer(dc, envelope)
        except (grpc.aio.AioRpcError, Unavailable) as exc:
            metrics.FORWARDS.labels("error").inc()
            return False, f"unreachable ({exc})"
        metrics.FORWARDS.labels("accepted" if reply.accepted else "refused").inc()
        if not reply.accepted:
            return False, reply.reason

        def point(record: peer_pb2.TaskRecord) -> None:
            record.forwarded_to_dc = dc
            record.status.dc = dc
            record.status.agent = ""

        with contextlib.suppress(MeshError):  # the task runs there either way
            await self.store.update(job.task_id, point, attempt=job.attempt)
        return True, "accepted"

    def _envelope(self, job: Job, max_tasks: float) -> peer_pb2.Envelope:
        envelope = peer_pb2.Envelope(
            path=[*job.path, self.cfg.agent_id],
            hops=len(job.path) + 1,
            deadline_unix_ms=job.deadline_ms,
            attempt=job.attempt,
            entry_agent=job.path[0] if job.path else self.cfg.agent_id,
            max_tasks=max_tasks,
        )
        envelope.spec.CopyFrom(job.spec)
        return envelope

    @staticmethod
    def _offer_timeout(job: Job) -> float:
        return min(OFFER_TIMEOUT_S, max(0.05, (job.deadline_ms - now_ms()) / 1000))

    # -- the receiving end -----------------------------------------------------------------

    async def offer(self, envelope: peer_pb2.Envelope) -> tuple[bool, str]:
        """Another agent asks us to take a task: decided by our own live load, not gossip."""
        if self.cfg.agent_id in envelope.path:
            return False, "loop: already visited"
        if envelope.hops > self.view.max_hops:
            return False, "hop limit"
        if not 0 < envelope.deadline_unix_ms <= MAX_DEADLINE_MS:
            raise InvalidTask("deadline out of range", deadline_unix_ms=envelope.deadline_unix_ms)
        job = Job(envelope.spec, envelope.attempt, envelope.deadline_unix_ms, list(envelope.path))
        if envelope.origin_dc and envelope.origin_dc != self.cfg.dc:
            accepted, reason = await self._adopt(job)
        else:
            accepted, reason = await self.accept(job, envelope.max_tasks)
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
            agent_id=self.cfg.agent_id,
            dc=self.cfg.dc,
            inline_payload_bytes=self.cfg.inline_payload_bytes,
        )
        stored, created = await self.store.create(record)
        if not created:
            if stored.record.spec_digest != digest:
                return False, "task id already used here by another task"
            if stored.record.forwarded_to_dc:
                # It left this DC once: taking it back would leave both records pointing
                # at each other and nobody running it. The DC that has it keeps it.
                return False, f"it was handed from here to DC {stored.record.forwarded_to_dc}"
            return True, "already here"
        try:
            where = await self.place(job, spill=False, wait=False)
        except MeshError as exc:
            with contextlib.suppress(MeshError):
                await self.store.delete(stored)
            return False, f"{self.cfg.dc} is full too: {exc.message}"
        log.info("took %s from DC %s, placed on %s", job.task_id, job.path[0], where)
        return True, "accepted"

    async def accept(self, job: Job, max_tasks: float) -> tuple[bool, str]:
        """Queue ``job`` here if our live load allows: within ``max_tasks`` running and
        queued after it, or (0) within our hard limit, slots plus queue length."""
        if job.deadline_ms <= now_ms():
            return False, "deadline passed"
        try:
            self.executor.check(job.spec)
        except MeshError as exc:
            return False, exc.message
        tasks = self.executor.running + self.executor.queued
        limit = max_tasks or self.executor.slots + self.cfg.max_queue_length
        if tasks + 1 > limit:
            return False, f"over the bound ({tasks + 1} > {limit:g} tasks)"
        # Enqueue before any await, so the check above still holds; the record follows.
        self.executor.enqueue(job)

        def mutate(record: peer_pb2.TaskRecord) -> None:
            status = record.status
            status.agent, status.dc = self.cfg.agent_id, self.cfg.dc
            del status.path[:]
            status.path.extend(job.path)
            if status.state == pb.TASK_STATE_PENDING:
                status.state = pb.TASK_STATE_QUEUED
                status.queued_at.CopyFrom(now_ts())

        try:
            await self.store.update(job.task_id, mutate, attempt=job.attempt)
        except MeshError as exc:
            if isinstance(exc, StaleWrite) and await self._runs_here(job):
                return True, "accepted"
            self.executor.cancel(job.task_id, "record refused")
            return False, f"record: {exc.message}"
        return True, "accepted"

    async def _runs_here(self, job: Job) -> bool:
        """Whether the record shows this agent running (or having run) ``job``'s attempt:
        a short task can start, even finish, before the accepting write lands."""
        try:
            status = (await self.store.get(job.task_id)).status
        except MeshError:
            return False
        return status.agent == self.cfg.agent_id and status.attempt == job.attempt

    async def fail(self, job: Job, code: str, message: str) -> None:
        with contextlib.suppress(MeshError):
            await self.store.finish(job.task_id, pb.TASK_STATE_FAILED, code, message)


def request_of(spec: pb.TaskSpec) -> Request:
    return Request(
        task_id=spec.task_id,
        model=spec.model,
        pipeline=spec.pipeline,
        affinity_key=spec.affinity_key,
        gpu_count=max(1, spec.gpu_count),
        min_gpu_memory_mb=spec.min_gpu_memory_mb,
    )
