"""The composition root: an agent's parts, built once, in dependency order.

Every part gets what it needs when it is built, from the parts built before it; a part
that must follow a change elsewhere connects to the event hub (``events``) rather than
being handed a callback into a part built later. The outside world comes in through
ports (``Ports``), each with one real adapter (``real_ports``): the DC's store
(``DcStore`` over etcd), peers (``PeerClients``, gRPC), gossip (``GossipNode``, UDP), the
GPUs and their runner (NVML's ``inventory`` and the pipelines), and the clock
(``mesh.core.clock``, and the event loop's timers). The simulator (``sim``) builds the
same parts over simulated ports.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from mesh import metrics
from mesh.agent.acceptance import Acceptance
from mesh.agent.addressing import Addressing
from mesh.agent.agentapi import AgentApi
from mesh.agent.api import ToTheEnd
from mesh.agent.apis import Apis
from mesh.agent.cancels import Cancels
from mesh.agent.conserve import Conserver
from mesh.agent.dcs import KnownDcs
from mesh.agent.decisionlog import DecisionLog
from mesh.agent.dispatch import DcRoom
from mesh.agent.duties import Duties
from mesh.agent.events import Events
from mesh.agent.executor import Executor
from mesh.agent.gate import QuotaGate
from mesh.agent.handover import Handover
from mesh.agent.history import History
from mesh.agent.intake import Intake
from mesh.agent.membership import Membership
from mesh.agent.owner import QueueOwner
from mesh.agent.peerapi import PeerApi
from mesh.agent.peers import Peers
from mesh.agent.placement import Placement
from mesh.agent.planning import Planning
from mesh.agent.ports import Gossip, Ports, real_ports
from mesh.agent.priorities import Priorities
from mesh.agent.reclaim import Sharing
from mesh.agent.remote import RemoteDcs
from mesh.agent.reporting import RecordReporter
from mesh.agent.reruns import Reruns
from mesh.agent.seat import OwnerSeat
from mesh.agent.slots import GpuSlots
from mesh.agent.speaker import Speaker
from mesh.agent.stages import Stages
from mesh.agent.submission import Submission
from mesh.agent.taskapi import TaskApi
from mesh.agent.tasks import Reach, Tasks
from mesh.agent.view import View
from mesh.config import AgentConfig
from mesh.core.router import Router
from mesh.core.routing import Policy
from mesh.core.tenants import online_share
from mesh.gpus import inventory
from mesh.pipelines import Models, Pipeline, load_pipelines
from mesh.store.dc import DcStore
from mesh.store.mirror import PrefixMirror
from mesh.store.quota import QuotaStore
from mesh.trust.tokens import Verifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """An agent's parts, as the composition root built them. The agent's lifecycle
    (``Agent``) starts and stops them; nothing else holds the whole set."""

    cfg: AgentConfig
    store: DcStore
    history: History
    duties: Duties
    events: Events
    decisions: DecisionLog | None
    peers: Peers
    slots: GpuSlots
    membership: Membership
    quota: QuotaStore
    executor: Executor
    view: View
    topology: PrefixMirror
    token_keys: PrefixMirror
    gossip: Gossip
    speaker: Speaker
    planning: Planning
    placement: Placement
    handover: Handover
    conserver: Conserver
    seat: OwnerSeat
    apis: Apis
    verifier: Verifier
    leaving: asyncio.Event  # set as the agent lets go of etcd: streams end
    ports: Ports


def build(cfg: AgentConfig, ports: Ports | None = None) -> Parts:
    """Every part of the agent ``cfg`` describes, wired over ``ports`` (the real ones by
    default); nothing started yet."""
    return _wire(cfg, ports or real_ports(cfg))


@dataclass(frozen=True)
class _Base:
    """What everything else is built on: the ports, the hub, membership and quota."""

    cfg: AgentConfig
    store: DcStore
    peers: Peers
    remote: RemoteDcs
    history: History
    duties: Duties
    events: Events
    decisions: DecisionLog | None
    pipelines: dict[str, Pipeline]
    models: Models
    router: Router
    known: KnownDcs
    slots: GpuSlots
    membership: Membership
    quota: QuotaStore
    priorities: Priorities


def _base(cfg: AgentConfig, store: DcStore, peers: Peers) -> _Base:
    events, duties = Events(), Duties()
    history = History(cfg.history, cfg.agent_id, cfg.dc)
    gpus = inventory(cfg.fake_gpus, cfg.gpu_weights)
    metrics.AGENT_INFO.labels(cfg.agent_id, cfg.dc).set(1)
    metrics.GPU_SLOTS.set(len(gpus))
    pipelines = load_pipelines(cfg)
    models = Models(
        cfg.preloaded_models,
        events.republish.emit,
        capacity_mb=sum(gpu.memory_mb for gpu in gpus),  # one pool: see Models
        on_evicted=lambda _: events.republish.emit(),
        on_loading=events.local.emit,
    )
    router = Router(Policy())  # default knobs until a topology is applied
    known = KnownDcs(cfg.dc, router)
    slots = GpuSlots(gpus, events.local.emit)
    membership = Membership(cfg, store, history, events, duties, slots, list(pipelines), models)
    events.weights.connect(membership.weights_changed)
    quota = store.quota(events.quota.emit, events.policy.emit, known.slots, known.held_elsewhere)
    return _Base(
        cfg=cfg,
        store=store,
        peers=peers,
        remote=RemoteDcs(peers),
        history=history,
        duties=duties,
        events=events,
        decisions=DecisionLog(cfg.decision_log) if cfg.decision_log else None,
        pipelines=pipelines,
        models=models,
        router=router,
        known=known,
        slots=slots,
        membership=membership,
        quota=quota,
        priorities=Priorities(cfg, quota, events),
    )


def _executor(b: _Base, stages: Stages) -> Executor:
    """The executor over the slots, gated by quota, its priority following the events."""
    cfg, quota, priorities, decisions = b.cfg, b.quota, b.priorities, b.decisions
    executor = Executor(
        cfg,
        b.slots,
        b.pipelines,
        b.models,
        RecordReporter(cfg, b.store.records, b.membership.lease_id, b.history, quota),
        priorities.policy(),
        on_load=b.events.local.emit,
        gate=QuotaGate(quota, decisions, b.events.quota),
        sharing=Sharing(
            online_share=lambda: online_share(quota.tenants, cfg.dc),
            shares=priorities.shares,
            decided=decisions.preempt if decisions is not None else Sharing().decided,
            preempted=b.events.preempted.emit,
        ),
        runner=stages.run,
    )
    b.events.quota.connect(executor.quota_changed)
    b.events.priority.connect(
        lambda: executor.set_priority(priorities.policy(), list(priorities.queues))
    )
    return executor


@dataclass(frozen=True)
class _Tasks:
    """The parts that move tasks: in, around the DC and to other DCs, and back."""

    placement: Placement
    intake: Intake
    addressing: Addressing
    submission: Submission
    tasks: Tasks
    cancels: Cancels
    reruns: Reruns
    handover: Handover
    conserver: Conserver
    known_pipelines: Callable[[], set[str]]


def _tasks(b: _Base, executor: Executor, view: View) -> _Tasks:
    cfg, store, registry = b.cfg, b.store, b.membership.registry

    def known_pipelines() -> set[str]:
        """The pipelines some agent of this DC runs."""
        return set(b.pipelines) | registry.pipelines()

    acceptance = Acceptance(cfg, store.records, executor, b.history)
    placement = Placement(
        cfg,
        store,
        view,
        registry,
        b.peers,
        b.remote,
        executor,
        acceptance.accept,
        b.known.summaries,
        b.duties.spawn,
        b.decisions,
    )
    addressing = Addressing(cfg.dc, store.records, store.claims, b.remote, b.known)
    handover = Handover(cfg.agent_id, store, placement, b.history, b.duties.spawn)
    reach = Reach(cfg.agent_id, store.records, registry, b.peers, b.remote, addressing)
    b.events.preempted.connect(handover.preempted)
    conserver = Conserver(
        cfg, executor, b.router, b.models, placement, store.records, acceptance.written, b.history
    )
    b.events.capacity.connect(conserver.changed)
    return _Tasks(
        placement=placement,
        intake=Intake(
            cfg,
            store.records,
            view,
            acceptance,
            placement.place,
            known_pipelines,
            b.duties.spawn,
            cfg.lease_ttl_s + cfg.etcd_outage_grace_s,
        ),
        addressing=addressing,
        submission=Submission(cfg, store.records, placement, addressing, b.duties.spawn),
        tasks=Tasks(reach, cfg.result_dir, b.known),
        cancels=Cancels(
            reach,
            store.backlog,
            executor,
            b.events.capacity.emit,
            b.duties.spawn,
            cfg.lease_ttl_s + cfg.etcd_outage_grace_s,
        ),
        reruns=Reruns(reach),
        handover=handover,
        conserver=conserver,
        known_pipelines=known_pipelines,
    )


def _seat(b: _Base, t: _Tasks) -> OwnerSeat:
    """The candidacy for the DC's queue owner, which builds an owner per lease."""
    cfg, store, membership, placement = b.cfg, b.store, b.membership, t.placement

    def owner() -> QueueOwner:
        value = f"{cfg.agent_id} {membership.peer_address}".encode()
        return QueueOwner(
            cfg.agent_id,
            store.election(membership.lease_id, value),
            store.records,
            store.backlog,
            lambda job: placement.place(job, patient=True),
            DcRoom(placement.room_for, b.router.free_slots, b.router.room_left),
            b.priorities.policy(),
            cfg.max_attempts,
            b.history,
            placement.handoffs,
            lambda: t.addressing.reconcile(
                lambda task_id, dc, why: t.cancels.cancel(
                    task_id, why, forward=False, superseded_by=dc
                )
            ),
        )

    registry = membership.registry
    return OwnerSeat(
        b.duties, owner, lambda: registry.peers, cfg.lease_ttl_s, b.events, b.priorities.policy
    )


def _planning(b: _Base, executor: Executor, view: View) -> tuple[Planning, Speaker]:
    """Where models should live, and what this DC tells the others of itself."""
    cfg, registry = b.cfg, b.membership.registry
    planning = Planning(
        cfg.agent_id,
        view,
        b.models,
        executor,
        b.priorities.estimates,
        b.pipelines,
        b.decisions,
        interval_s=cfg.plan_interval_s,
        acting=cfg.placement_plan,
    )
    speaker = Speaker(
        cfg.dc,
        cfg.agent_id,
        b.store,
        b.known,
        b.membership.lease_id,
        b.router,
        lambda: registry.peers,
        b.remote,
        lambda: b.slots.accepting,
        b.quota.global_held,
        lambda: planning.demand,
    )
    return planning, speaker


def _wire(cfg: AgentConfig, ports: Ports) -> Parts:
    store, peers = ports.store, ports.peers
    b = _base(cfg, store, peers)
    registry = b.membership.registry
    stages = Stages(cfg, b.router, registry, peers, b.slots, b.models, b.pipelines)
    executor = _executor(b, stages)
    view = View(cfg, b.router, executor, b.models, b.remote, b.known, b.events, ports.rng)
    t = _tasks(b, executor, view)
    planning, speaker = _planning(b, executor, view)
    verifier = Verifier(cfg.mesh_name, max_ttl_s=cfg.max_token_ttl_s)

    def token_keys_changed(items: dict[str, bytes]) -> None:
        verifier.update(items)
        log.info("token keys: %s", ", ".join(verifier.kids) or "none")

    leaving, to_the_end = asyncio.Event(), ToTheEnd()
    apis = Apis(
        TaskApi(
            cfg,
            t.known_pipelines,
            t.addressing,
            t.submission,
            t.tasks,
            t.cancels,
            t.reruns,
            leaving,
            to_the_end,
        ),
        AgentApi(b.membership, view, planning, t.placement, b.quota, store, b.known, b.priorities),
        PeerApi(
            cfg.dc, t.intake, view, speaker, t.addressing, stages, t.tasks, t.cancels, to_the_end
        ),
    )
    return Parts(
        cfg=cfg,
        store=store,
        history=b.history,
        duties=b.duties,
        events=b.events,
        decisions=b.decisions,
        peers=peers,
        slots=b.slots,
        membership=b.membership,
        quota=b.quota,
        executor=executor,
        view=view,
        topology=store.topology(view.topology_changed),
        token_keys=store.token_keys(token_keys_changed),
        gossip=ports.gossip(view.gossiper, view.went_quiet),
        speaker=speaker,
        planning=planning,
        placement=t.placement,
        handover=t.handover,
        conserver=t.conserver,
        seat=_seat(b, t),
        apis=apis,
        verifier=verifier,
        leaving=leaving,
        ports=ports,
    )
