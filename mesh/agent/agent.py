"""One agent: what it is made of, and its lifecycle.

Start: connect to etcd, open the lease session, follow the applied topology, register,
mirror the peers, run the executor, gossip and DC summaries, stand for queue owner. Stop
(SIGTERM): mark itself draining so peers stop sending, resign the DC's queue, hand queued
tasks to peers at once, let running tasks finish within ``drain_grace_s`` and hand over
the rest, revoke the lease (the membership key vanishes at once).

The parts each live in their own module: the router's view (``view``), placement and
offers (``placement``), the executor, reading and cancelling tasks (``tasks``), DC
summaries (``speaker``), the queue owner (``owner``). The edges reach them only through
``AgentApi`` (``api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from mesh import metrics
from mesh.agent.addressing import Addressing
from mesh.agent.api import AgentApi
from mesh.agent.duties import Duties, Kept
from mesh.agent.executor import Executor
from mesh.agent.handover import Handover
from mesh.agent.history import History
from mesh.agent.intake import Intake
from mesh.agent.lag import measure_lag
from mesh.agent.owner import QueueOwner
from mesh.agent.peers import PeerClients
from mesh.agent.placement import Placement
from mesh.agent.planning import Planning
from mesh.agent.remote import RemoteDcs
from mesh.agent.reporting import RecordReporter, prune_results
from mesh.agent.speaker import Speaker
from mesh.agent.stages import Stages
from mesh.agent.submission import Submission
from mesh.agent.tasks import Tasks
from mesh.agent.view import View
from mesh.channels import Security
from mesh.config import AgentConfig
from mesh.core import priority
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.core.tenants import blocked, online_share, renewal_in_s
from mesh.errors import MeshError, Unavailable
from mesh.gossip.transport import GossipNode
from mesh.gpus import inventory, weight_of
from mesh.pipelines import Models, load_pipelines
from mesh.store import topostore
from mesh.store.claims import ClaimStore
from mesh.store.election import Election
from mesh.store.etcd import client_for
from mesh.store.group import GroupCommit
from mesh.store.keys import KeySpace
from mesh.store.mirror import PrefixMirror
from mesh.store.quota import QuotaStore
from mesh.store.records import TaskStore
from mesh.store.registry import ACTIVE, DRAINING, AgentRecord, Registry
from mesh.store.retention import Retention
from mesh.store.session import Session
from mesh.store.topostore import token_keys
from mesh.trust.tokens import Verifier

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.keys = KeySpace(cfg.prefix, cfg.dc)
        self.security = (
            Security(cfg.mesh_name, insecure=True)
            if cfg.insecure
            else Security.from_files(cfg.mesh_name, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        )
        self.client = client_for(cfg.etcd_endpoints, security=self.security)
        self.history = History(cfg.history, cfg.agent_id, cfg.dc)
        self.session = self._new_session()
        self.duties = Duties()
        keep_s = cfg.task_retention_s
        self.retention = Retention(self.client, keep_s, keep_s / 24, cfg.max_deadline_s)
        self.store = TaskStore(self.client, self.keys, self.retention, GroupCommit(self.client))
        self.registry = Registry(
            self.client, self.keys, lambda: self.session.lease_id, self._members_changed
        )
        self.peers = PeerClients(self.security, cfg.max_message_bytes)
        self.remote = RemoteDcs(self.peers)
        self.gpus = inventory(cfg.fake_gpus, cfg.gpu_weights)
        self.pipelines = load_pipelines(cfg)
        self.models = Models(
            cfg.preloaded_models,
            self._republish_soon,
            capacity_mb=sum(gpu.memory_mb for gpu in self.gpus),  # one pool: see Models
            on_evicted=lambda _: self._republish_soon(),
            on_loading=lambda: self.view.local_changed(),
        )
        self._renewal: asyncio.TimerHandle | None = None  # a spent budget renewed
        self.quota = QuotaStore(
            self.client,
            self.keys,
            lambda: self.executor.quota_changed(),
            self._priorities_changed,
            self._dc_slots,
            self._held_elsewhere,
        )
        self.estimates = priority.Estimates()
        metrics.AGENT_INFO.labels(cfg.agent_id, cfg.dc).set(1)
        metrics.GPU_SLOTS.set(len(self.gpus))
        reporter = RecordReporter(
            cfg, self.store, lambda: self.session.lease_id, self.history, self.quota
        )
        self.executor = Executor(
            cfg,
            self.gpus,
            self.pipelines,
            self.models,
            reporter,
            self._priority(),
            lambda: self.view.local_changed(),
            quota=self._quota_verdict,
            online_share=lambda: online_share(self.quota.tenants, cfg.dc),
            on_preempted=self._preempted,
            shares=self._shares,
            decided=self._preemption_decided,
            runner=lambda pipeline, ctx: self.stages.run(pipeline, ctx),
        )
        self.view = View(
            cfg,
            self.executor,
            self.models,
            self.remote,
            on_capacity=self._capacity_changed,
            on_queues=self._queues_changed,
            on_weights=self._republish_soon,
        )
        self.topology_mirror = PrefixMirror(
            self.client, topostore.directory(cfg.prefix), self.view.topology_changed
        )
        # The public keys bearer tokens are checked against, as the operator publishes them.
        self.verifier = Verifier(cfg.mesh_name, max_ttl_s=cfg.max_token_ttl_s)
        self.token_keys = PrefixMirror(
            self.client, token_keys(cfg.prefix), self._token_keys_changed
        )
        self.gossip = GossipNode(
            self.view.gossiper,
            cfg.gossip_listen,
            self.view.went_quiet,
            drop_rate=cfg.gossip_drop_rate,
        )
        self.speaker = Speaker(
            cfg.dc,
            cfg.agent_id,
            self.client,
            self.keys,
            lambda: self.session.lease_id,
            self.view.router,
            lambda: self.registry.peers,
            self.remote,
            lambda: self.executor.accepting,
            self.quota.global_held,
            lambda: self.planning.demand,
        )
        self.placement = Placement(
            cfg,
            self.keys,
            self.store,
            self.view,
            self.registry,
            self.peers,
            self.remote,
            self.executor,
            lambda job, most, reclaim: self.intake.accept(job, most, reclaim),
            lambda: self.speaker.heard,
            self.duties.spawn,
        )
        self.stages = Stages(
            cfg, self.view, self.registry, self.peers, self.executor, self.models, self.pipelines
        )
        self.intake = Intake(
            cfg, self.store, self.view, self.executor, self.placement.place, self.known_pipelines
        )
        self.addressing = Addressing(
            cfg.dc,
            self.store,
            ClaimStore(self.client, self.keys, self.retention, self.store.commits),
            self.remote,
            self._dcs,
        )
        self.submission = Submission(
            cfg, self.store, self.placement, self.addressing, self.duties.spawn
        )
        self.planning = Planning(
            cfg.agent_id,
            self.view,
            self.models,
            self.executor,
            self.estimates,
            self.pipelines,
            lambda: self.placement.decisions,
            interval_s=cfg.plan_interval_s,
            acting=cfg.placement_plan,
        )
        self.tasks = Tasks(
            cfg.agent_id,
            self.store,
            self.registry,
            self.peers,
            self.remote,
            self.executor,
            self._capacity_changed,
            cfg.result_dir,
            self.addressing,
            self._dcs,
        )
        self.handover = Handover(cfg.agent_id, self.store, self.placement, self.history)
        self.api = AgentApi(self)
        self.owner: QueueOwner | None = None
        self._owner_duties: list[Kept] = []  # the owner's campaign and its guard
        self.address = ""
        self.peer_address = ""
        self.http_url = ""  # set by the server once its HTTP port is bound
        self.metrics_url = ""  # set by the process once /metrics is served
        self.gossip_address = ""
        self._incarnation = 0
        self.stopping = False
        self.leaving = asyncio.Event()  # set as the agent lets go of etcd: streams end
        self._handing: asyncio.Future[list[None]] | None = None

    # -- starting ------------------------------------------------------------------------

    async def start(self, address: str, peer_address: str) -> None:
        """Register and begin work; clients reach us at ``address`` (the API port), peers
        and certificate holders at ``peer_address`` (the mTLS port)."""
        self.address, self.peer_address = address, peer_address
        try:
            await self.client.connect()
            await self.session.open()
        except MeshError:
            raise
        except Exception as exc:
            raise Unavailable(f"cannot reach etcd at {self.cfg.etcd_endpoints}: {exc}") from exc
        bound = await self.gossip.start()
        self.gossip_address = self.cfg.gossip_advertise or bound
        self.duties.keep("topology", self.topology_mirror.run)
        self.duties.keep("token keys", self.token_keys.run)
        await asyncio.wait_for(self.topology_mirror.ready.wait(), timeout=10)
        leftovers = await self.handover.release_leftovers(self.cfg.max_attempts)
        self._incarnation = now_ms()
        # The caps are known before any work can come: peers offer tasks as soon as the
        # record is published, and a task run before the policy is read would take no slot.
        self.duties.keep("quota", self.quota.mirror.run)
        await asyncio.wait_for(self.quota.mirror.ready.wait(), timeout=10)
        await self.registry.publish(self.record())
        self.duties.keep("membership", self.registry.mirror.run)
        self.duties.keep("executor", self.executor.run)
        keep_s = self.cfg.task_retention_s
        self.duties.keep(
            "result retention",
            lambda: prune_results(self.cfg.result_dir, keep_s, min(60.0, keep_s / 4)),
        )
        self.duties.keep("session", self._watch_session)
        self.duties.keep("loop lag", measure_lag)
        self.duties.keep("gossip", self.gossip.run)
        self.duties.keep("summaries", self.speaker.mirror.run)
        self.duties.keep("dc summaries", self.speaker.speak)
        self.duties.keep("placement plan", self.planning.run)
        await asyncio.wait_for(self.registry.mirror.ready.wait(), timeout=10)
        await self._start_owner()  # after the mirror: an owner must know who is alive
        for job in leftovers:
            self.duties.spawn(f"re-place {job.task_id}", self._place_leftover(job))
        version = self.view.topology.version if self.view.topology else 0
        log.info(
            "agent ready",
            extra={
                "address": address,
                "peer_address": peer_address,
                "http_url": self.http_url,
                "gpus": len(self.gpus),
                "topology": version,
            },
        )

    async def _place_leftover(self, job: Job) -> None:
        try:
            await self.placement.place(job, patient=True)
        except MeshError as exc:
            await self.placement.fail(job, exc.code, f"could not be placed again: {exc.message}")

    def _new_session(self) -> Session:
        def on_state(state: str) -> None:
            self.history.write("lease", state, lease=self.session.lease_id)

        return Session(self.client, self.cfg.lease_ttl_s, self.cfg.etcd_outage_grace_s, on_state)

    async def _start_owner(self) -> None:
        """Stand for the DC's queue owner under the current lease (after stopping the
        owner of the lease before, if any)."""
        await self._stop_owner()
        election = Election(
            self.client,
            self.keys.election,
            lambda: self.session.lease_id,
            f"{self.cfg.agent_id} {self.peer_address}".encode(),
        )
        router = self.view.router
        self.owner = QueueOwner(
            self.cfg.agent_id,
            election,
            self.store,
            self.keys,
            lambda job: self.placement.place(job, patient=True),
            self.placement.room_for,
            router.free_slots,
            router.room_left,
            self._priority(),
            self.cfg.max_attempts,
            self.history,
            self.placement.handoffs,
            lambda: self.addressing.reconcile(
                lambda task_id, dc, why: self.tasks.cancel(
                    task_id, why, forward=False, superseded_by=dc
                )
            ),
        )
        self.owner.members_changed(self.registry.peers)
        owner = self.owner
        self._owner_duties = [
            self.duties.keep("queue owner", owner.run),
            self.duties.keep("owner guard", lambda: owner.guard(self.cfg.lease_ttl_s)),
        ]

    async def _stop_owner(self) -> None:
        for kept in self._owner_duties:
            await kept.stop()
        self._owner_duties = []

    def _dc_slots(self) -> dict[str, int]:
        """Every DC's GPU slots as this agent knows them, which global caps are split by:
        its own from its view of the DC, the others' from their last summary (a DC never
        heard from counts as alike to this one)."""
        own = self.view.router.totals().slots
        heard = {dc: summary.slots for dc, summary in self.speaker.heard.items()}
        return {dc: own for dc in self._dcs()} | heard | {self.cfg.dc: own}

    def _held_elsewhere(self, group: str) -> int:
        """GPUs ``group`` holds against its global cap in the other DCs, as their last
        summaries said."""
        heard = self.speaker.heard.items()
        return sum(s.global_held.get(group, 0) for dc, s in heard if dc != self.cfg.dc)

    def _dcs(self) -> list[str]:
        """The DCs of the applied topology (none before one is applied)."""
        return sorted(self.view.topology.topology.dcs) if self.view.topology else []

    def known_pipelines(self) -> set[str]:
        """The pipelines some agent of this DC runs."""
        return set(self.pipelines) | self.registry.pipelines()

    # -- what it tells the DC ------------------------------------------------------------

    def record(self, state: str = ACTIVE) -> AgentRecord:
        return AgentRecord(
            agent_id=self.cfg.agent_id,
            dc=self.cfg.dc,
            address=self.address,
            gpus=tuple(self.gpus),
            weight=weight_of(self.gpus, self.view.gpu_weights),
            pipelines=tuple(sorted(self.pipelines)),
            models=tuple(self.cfg.models),
            models_loaded=tuple(sorted(self.models.loaded)),
            state=state,
            incarnation=self._incarnation,
            queues=tuple(self.cfg.queues),
            queue_limit=self.cfg.max_queue_length,
            gossip_address=self.gossip_address,
            peer_address=self.peer_address,
            http_url=self.http_url,
            metrics_url=self.metrics_url,
        )

    def _republish_soon(self) -> None:
        if self.registry.me is not None:
            self.duties.spawn("republish", self._republish())

    async def _republish(self) -> None:
        state = self.registry.me.state if self.registry.me else ACTIVE
        try:
            await self.registry.publish(self.record(state))
        except Unavailable as exc:
            log.warning("could not update agent record: %s", exc)

    async def drain(self) -> AgentRecord:
        """Take no new tasks (peers see it draining); the ones here run to their end."""
        self.executor.accepting = False
        await self.registry.publish(self.record(DRAINING))
        return self.record(DRAINING)

    async def undrain(self) -> AgentRecord:
        """Take work again after a drain (not after a stop: that one is for good)."""
        if self.stopping:
            raise Unavailable("the agent is shutting down")
        self.executor.accepting = True
        await self.registry.publish(self.record(ACTIVE))
        self.view.local_changed()
        return self.record(ACTIVE)

    # -- what it hears -------------------------------------------------------------------

    def _token_keys_changed(self, items: dict[str, bytes]) -> None:
        self.verifier.update(items)
        log.info("token keys: %s", ", ".join(self.verifier.kids) or "none")

    def _members_changed(self, changes: dict[str, AgentRecord | None]) -> None:
        self.view.members_changed(changes)
        if self.owner is not None:
            self.owner.members_changed(changes)

    def _capacity_changed(self) -> None:
        if self.owner is not None:
            self.owner.capacity_changed()

    def _queues_changed(self, queues: dict[str, int]) -> None:
        self.cfg = self.cfg.model_copy(update={"queues": queues})
        self._priorities_changed()

    def _quota_verdict(self, job: Job) -> str | None:
        """Why ``job`` must wait for its tenant's quota (None: it may start); a capped
        task's verdict goes to the decision log."""
        user, gpus = job.spec.user, max(1, job.spec.gpu_count)
        judged = self.quota.judge(user.id, user.group, gpus, time.time())
        if (judged.caps or judged.budgets) and self.placement.decisions is not None:
            self.placement.decisions.quota(job.task_id, gpus, judged)
        if judged.reason and not blocked(judged.caps, judged.held, gpus):
            self._judge_again_in(renewal_in_s(judged.budgets, judged.now_s))
        return judged.reason

    def _judge_again_in(self, delay_s: float) -> None:
        """Judge the waiting tasks again when a spent budget is renewed: nothing in etcd
        changes then, so nothing else would wake them."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay_s
        if self._renewal is not None and self._renewal.when() <= at:
            return
        if self._renewal is not None:
            self._renewal.cancel()
        self._renewal = loop.call_at(at, self._renewed)

    def _renewed(self) -> None:
        self._renewal = None
        self.executor.quota_changed()

    def _shares(self) -> dict[str, float]:
        """Each group's fair-share weight, as the tenants policy sets it."""
        tenants = self.quota.tenants
        return {g: spec.share for g, spec in tenants.groups.items()} if tenants else {}

    def _preemption_decided(self, *decision: Any) -> None:
        if self.placement.decisions is not None:
            self.placement.decisions.preempt(*decision)

    def _preempted(self, job: Job) -> None:
        metrics.PREEMPTED.labels(job.spec.user.group or metrics.NO_GROUP).inc()
        self.duties.spawn(f"preempted {job.task_id}", self.handover.give_back(job, preempted=True))

    def _priority(self) -> priority.Policy:
        """A fresh policy as the topology's queues and the tenants file set it now (run
        times learned so far are kept)."""
        tenants = self.quota.tenants
        if tenants is None:
            return priority.Weighted(self.cfg.queues, self.cfg.queue_aging_s, self.estimates)
        return priority.make(
            tenants.priority.policy,
            self.cfg.queues,
            {group: spec.share for group, spec in tenants.groups.items()},
            tenants.priority.aging_s or self.cfg.queue_aging_s,
            self.estimates,
        )

    def _priorities_changed(self) -> None:
        self.executor.set_priority(self._priority(), list(self.cfg.queues))
        if self.owner is not None:
            self.owner.dispatcher.policy = self._priority()

    async def _watch_session(self) -> None:
        """A lost lease means peers think we are dead: come back as a new incarnation.

        Registry and reporter read the lease through ``self.session``, so replacing the
        session is enough. The jobs dropped with the old lease are handed back once the
        new one holds, unless the DC's owner re-queued them meanwhile (it does when the
        lease expired; not when we gave it up during an etcd outage, as the lease may
        still live and hide our death from it).
        """
        while True:
            await self.session.lost.wait()
            if self.stopping:
                return
            log.error("membership lease lost: dropping my tasks and registering again")
            # The DC's owner re-queues them elsewhere; finishing them here would race it.
            dropped = self.executor.abandon("this agent lost its membership lease")
            await self.session.close(revoke=False)
            self.session = self._new_session()
            try:
                await self.session.open()
                self._incarnation = now_ms()
                await self.registry.publish(self.record())
                await self._start_owner()
            except MeshError as exc:
                log.error("re-registration failed: %s; retrying", exc)
                self.session.lost.set()
                await asyncio.sleep(1)
                continue
            self.history.write("lease", "new", lease=self.session.lease_id)
            for job in dropped:
                await self.handover.give_back(job, after_loss=True)

    # -- stopping ------------------------------------------------------------------------

    async def begin_drain(self) -> None:
        """The first step of a stop: peers and clients see this agent draining, the DC's
        queue and this agent's queued jobs go to others at once. It still serves calls
        (and forwards Submits) until ``stop``, so a client in flight is not refused."""
        if self.stopping:
            return
        self.stopping = True
        with contextlib.suppress(MeshError):
            await self.registry.publish(self.record(DRAINING))
        if self.owner is not None:  # hand the DC's queue over at once
            await self._stop_owner()
            await self.owner.election.resign()
        queued = self.executor.close_queue()
        self._handing = asyncio.gather(*(self.handover.give_back(job) for job in queued))

    async def stop(self, grace_s: float) -> None:
        """Let running tasks finish within ``grace_s``, hand over the rest, and leave."""
        if not self.stopping:
            await self.begin_drain()
        interrupted = await self.executor.drain(grace_s)
        if self._handing is not None:
            await self._handing
        for job in interrupted:
            await self.handover.give_back(job)
        self.leaving.set()
        await asyncio.sleep(0)  # the streams that end now see it before etcd is gone
        await self.session.close(revoke=True)
        await self.duties.stop()
        await self.peers.close()
        self.gossip.close()
        self.placement.close()
        self.history.close()
        with contextlib.suppress(Exception):
            await self.client.close()
