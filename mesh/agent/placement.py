"""Where tasks go: the sending end of an offer.

It asks the pure ``Router`` for targets and offers the task to each in turn: agents of
this DC first, then (with the replies' fresher loads) a second decision that may hand it
to another DC or leave it in the DC's durable backlog. The receiving end is
``mesh.agent.intake``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from opentelemetry import trace

from mesh import logs, metrics, tracing
from mesh.agent.decisionlog import DecisionLog
from mesh.agent.executor import Executor
from mesh.agent.handoff import Handoffs
from mesh.agent.peers import Peers
from mesh.agent.remote import RemoteDcs
from mesh.agent.view import View
from mesh.config import AgentConfig
from mesh.core import backlog, classes, summaries
from mesh.core.backlog import Room
from mesh.core.clock import now_ms, now_ts
from mesh.core.jobs import Job
from mesh.core.lifecycle import still_placing
from mesh.core.routing import AGENT, BACKLOG, DC, NO_SPILL, NONE_ELIGIBLE, Decision, Request, Spill
from mesh.errors import AlreadyPlaced, CancelAsked, MeshError, NoCapacity
from mesh.store.dc import DcStore
from mesh.store.registry import Registry
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

OFFER_TIMEOUT_S = 2.0
RECLAIM_ASKS = 3  # full agents an online task asks to reclaim GPUs before the backlog
MAX_DEADLINE_MS = 253402300799_000  # 9999-12-31: the last instant a record can hold


class Placement:
    def __init__(
        self,
        cfg: AgentConfig,
        store: DcStore,
        view: View,
        registry: Registry,
        peers: Peers,
        remote: RemoteDcs,
        executor: Executor,
        accept_here: Callable[[Job, float, bool], Awaitable[tuple[bool, str]]],
        other_dcs: Callable[[], Mapping[str, peer_pb2.DcSummary]],
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
        decisions: DecisionLog | None = None,
    ) -> None:
        """``view`` is the router's view of the DC and the applied topology's overflow;
        ``accept_here`` is this agent's own receiving end (``Acceptance.accept``), for the
        targets that name it; ``other_dcs`` gives the other DCs' summaries as last
        heard; ``spawn`` runs background work the agent cancels when it stops. Of
        ``cfg``, only the identity and the limits are read."""
        self.cfg = cfg
        self.store = store.records
        self.backlog = store.backlog
        self.view = view
        self.router = view.router
        self.registry = registry
        self.peers = peers
        self.remote = remote
        self.executor = executor
        self._accept_here = accept_here
        self.handoffs = Handoffs(cfg.dc, cfg.agent_id, self.store, remote, spawn, self.place)
        self._summaries = other_dcs
        self.decisions = decisions

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
        request = request_of(spec, *self.view.costs(spec))
        options = self.spill() if spill else NO_SPILL
        with metrics.ROUTE_SECONDS.time():
            decision = self.router.route(request, visited, options, explain=explain)
        if self.decisions is not None and not explain:
            self.decisions.write(self.router, request, visited, options, decision)
        return decision

    def room_for(self, spec: pb.TaskSpec) -> Room:
        """Whether an agent of this DC could take ``spec`` now (the backlog waits for
        local room: other DCs were tried before the task went into it). An agent that
        has just refused is no room until news of it comes (its queue may be full below
        the router's bound): else the owner would take the task, be refused and put it
        back in a loop as fast as etcd writes."""
        first = self.router.route(request_of(spec, *self.view.costs(spec))).first
        if first is NONE_ELIGIBLE:
            return Room.NOT_HERE
        if first.kind == BACKLOG or self.router.is_suspect(first.name):
            return Room.FULL
        return Room.FREE

    async def _to_backlog(self, job: Job) -> None:
        """Wait in the DC's durable backlog: the record and the entry in one transaction."""
        enqueued = job.enqueued_ms or now_ms()
        entry = self.backlog.entry(job.spec.queue, enqueued, job.task_id)

        def mutate(record: peer_pb2.TaskRecord) -> None:
            still_placing(record)
            status = record.status
            status.state, status.agent, status.dc = pb.TASK_STATE_QUEUED, "", self.cfg.dc
            record.forwarded_to_dc = ""
            record.backlog_entry = self.backlog.name_of(entry)
            del status.path[:]
            status.path.extend(job.path)
            status.queued_at.CopyFrom(now_ts())
            status.ClearField("expected_start")  # no agent's estimate holds in the backlog

        value = backlog.entry_value(job.deadline_ms, job.traits)
        await self.backlog.enqueue(job.task_id, entry, value, mutate, job.attempt)
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
        parent = tracing.joined(job.traceparent) if job.traceparent else None
        with (
            logs.task(job.task_id),
            tracing.TRACER.start_as_current_span(
                "place",
                context=parent,
                attributes={"task.id": job.task_id, "task.attempt": job.attempt},
            ) as span,
        ):
            try:
                where = await self._place(job, spill, wait, patient, span)
            except AlreadyPlaced as placed:
                # An offer in this DC whose answer was lost (a timeout) landed after all.
                log.info("%s was taken by %s after all", job.task_id, placed.agent)
                where = placed.agent
            except CancelAsked:
                # Cancelled while being placed: the Cancel was answered from the record
                # here, so the task ends here rather than run where the request is unseen.
                await self.store.finish(
                    job.task_id,
                    pb.TASK_STATE_CANCELLED,
                    "CANCELLED",
                    "cancelled while being placed",
                    attempt=job.attempt,
                )
                where = "nowhere: cancelled"
            span.set_attribute("placed", where)
            return where

    async def _place(
        self, job: Job, spill: bool, wait: bool, patient: bool, span: trace.Span
    ) -> str:
        visited = set(job.path)
        refused: list[str] = []
        refused_full: list[str] = []  # agents that were full: they may reclaim
        for final in (False, True):
            decision = self.route(job.spec, visited, spill=spill)
            span.set_attributes(
                {
                    "route.round": 2 if final else 1,
                    "route.targets": [f"{t.kind}:{t.name}" for t in decision.targets],
                    "route.reason": decision.first.reason,
                    "route.bound": decision.bound,
                }
            )
            for target in decision.targets:
                if target.kind == AGENT:
                    accepted, reason = await self.offer_agent(target.name, target.max_tasks, job)
                    if accepted:
                        self.view.spill_share.record(False)
                        return target.name
                    visited.add(target.name)
                    refused.append(f"{target.name}: {reason}")
                    if reason.startswith("over the bound"):
                        refused_full.append(target.name)
                elif not final:
                    break
                elif target.kind == DC:
                    accepted, reason = await self.offer_dc(target.name, job)
                    if accepted:
                        self.view.spill_share.record(True)
                        return f"dc:{target.name}"
                    refused.append(f"dc {target.name}: {reason}")
                elif (taken := await self._reclaim(job, refused_full)) is not None:
                    return taken
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

    async def _reclaim(self, job: Job, full: list[str]) -> str | None:
        """An online task every agent was full for: ask the first few of them (in the
        router's order) to take it by preempting batch work that borrowed online's GPUs,
        rather than leave it in the backlog behind batch until a queue has room."""
        if classes.task_class(job.spec) != classes.ONLINE:
            return None
        # The agents that said they were full, else (the router saw every one full and
        # asked none) the task's eligible agents in the router's order.
        ring = [c.agent_id for c in self.route(job.spec, explain=True, spill=False).candidates]
        asked = [a for a in dict.fromkeys([*full, *ring]) if a not in job.path]
        for agent_id in asked[:RECLAIM_ASKS]:
            accepted, _ = await self.offer_agent(agent_id, 0.0, job, reclaim=True)
            if accepted:
                log.info("%s reclaims GPUs from batch for online task %s", agent_id, job.task_id)
                return agent_id
        return None

    def _durable(self, job: Job) -> bool:
        return len(job.spec.payload) <= self.cfg.inline_payload_bytes

    async def offer_agent(
        self, agent_id: str, max_tasks: float, job: Job, reclaim: bool = False
    ) -> tuple[bool, str]:
        """Offer ``job`` to agent ``agent_id`` of this DC (this one included), which takes
        it if it would then hold at most ``max_tasks`` (0: its own bound)."""
        if agent_id == self.cfg.agent_id:
            accepted, reason = await self._accept_here(job, max_tasks, reclaim)
            self.router.set_suspect(agent_id, not accepted)  # as a peer that refused is
            return accepted, reason
        peer = self.registry.peers.get(agent_id)
        if peer is None:
            return False, "not a member now"
        if len(job.path) + 1 > self.view.max_hops:
            return False, "hop limit"
        envelope = offered(job, self.cfg.agent_id, max_tasks)
        envelope.reclaim = reclaim
        try:
            with metrics.OFFER_SECONDS.time():
                reply = await self.peers.offer(
                    peer.peer_address, self.cfg.dc, envelope, offer_timeout(job)
                )
        except MeshError as exc:
            metrics.FORWARDS.labels("error").inc()
            self.router.set_suspect(agent_id, True)
            return False, f"unreachable ({exc.code})"
        self.view.learn(agent_id, reply.load, reply.accepted)
        metrics.FORWARDS.labels("accepted" if reply.accepted else "refused").inc()
        return reply.accepted, reply.reason

    async def offer_dc(self, dc: str, job: Job) -> tuple[bool, str]:
        """Hand ``job`` to DC ``dc``: its record moves there, ours points to it
        (``mesh.agent.handoff`` keeps the two DCs from both answering for it)."""
        if len(job.path) + 1 > self.view.max_hops:
            return False, "hop limit"
        return await self.handoffs.offer(dc, job, self.dc_envelope(job))

    def dc_envelope(self, job: Job) -> peer_pb2.Envelope:
        envelope = offered(job, self.cfg.agent_id, 0.0)
        envelope.origin_dc = self.cfg.dc
        return envelope

    async def fail(self, job: Job, code: str, message: str) -> None:
        with contextlib.suppress(MeshError):
            await self.store.finish(job.task_id, pb.TASK_STATE_FAILED, code, message)


def offered(job: Job, me: str, max_tasks: float) -> peer_pb2.Envelope:
    """``job`` as agent ``me`` offers it, with the most tasks the taker may then hold."""
    envelope = peer_pb2.Envelope(
        path=[*job.path, me],
        hops=len(job.path) + 1,
        deadline_unix_ms=job.deadline_ms,
        attempt=job.attempt,
        entry_agent=job.path[0] if job.path else me,
        max_tasks=max_tasks,
        traceparent=job.traceparent,
        waited_s=job.waited_s,
    )
    envelope.spec.CopyFrom(job.spec)
    return envelope


def offer_timeout(job: Job) -> float:
    return min(OFFER_TIMEOUT_S, max(0.05, (job.deadline_ms - now_ms()) / 1000))


def request_of(spec: pb.TaskSpec, run_s: float = 0.0, load_s: float = 0.0) -> Request:
    """What the router needs of ``spec``; ``run_s`` and ``load_s`` (0: unknown) what a
    run and a load of its model are expected to take."""
    return Request(
        task_id=spec.task_id,
        model=spec.model,
        pipeline=spec.pipeline,
        affinity_key=spec.affinity_key,
        gpu_count=max(1, spec.gpu_count),
        min_gpu_memory_mb=spec.min_gpu_memory_mb,
        run_s=run_s,
        load_s=load_s,
    )
