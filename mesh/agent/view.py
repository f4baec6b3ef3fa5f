"""The router's view of the DC, and what feeds it.

Membership comes from etcd (the registry's mirror), load and loaded models from gossip
and from this agent's own executor, routing knobs and overflow from the applied topology;
every offer reply refreshes it too (``mesh.agent.placement``). The ``Router`` itself is
pure: this module is where the live world is written into it, and where the gossiper
learns this agent's own state to tell the others.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

from mesh import metrics
from mesh.agent.dcs import KnownDcs
from mesh.agent.events import Events
from mesh.agent.executor import Executor
from mesh.agent.remote import RemoteDcs
from mesh.config import AgentConfig
from mesh.core.clock import now_ms
from mesh.core.router import Router
from mesh.core.routing import Member, Overflow, Policy
from mesh.core.spill import SpillShare
from mesh.errors import ConfigError
from mesh.gossip.protocol import GossipConfig, Gossiper
from mesh.gossip.state import AgentState, make_version
from mesh.gossip.wire import Keyring
from mesh.pipelines import Models
from mesh.store import topostore
from mesh.store.registry import DRAINING, AgentRecord
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


class View:
    def __init__(
        self,
        cfg: AgentConfig,
        router: Router,
        executor: Executor,
        models: Models,
        remote: RemoteDcs,
        known: KnownDcs,
        events: Events,
        rng: random.Random | None = None,
    ) -> None:
        """Tells ``events`` of load or membership changed (``capacity``: the queue owner
        looks again), of a topology's new queue classes (``queues``) and GPU weights
        (``weights``); hears of its own agent's changes (``local``) and of members."""
        self._cfg = cfg
        self._executor = executor
        self._models = models
        self._remote = remote
        self._known = known
        self._rng = rng or random.Random()  # the gossiper's choices of peers
        self._on_capacity = events.capacity.emit
        self._on_queues = events.queues.emit
        self._on_weights = events.weights.emit
        events.local.connect(self.local_changed)
        events.members.connect(self.members_changed)
        # Until an applied topology says otherwise: default knobs, no overflow.
        self.router = router
        self.topology: topostore.Applied | None = None
        self.overflow: tuple[Overflow, ...] = ()
        self.spill_share = SpillShare(max_share=0.0)
        self.max_hops = cfg.max_hops
        self.gpu_weights = dict(cfg.gpu_weights)
        self.gossiper = self._gossiper()

    def _gossiper(self) -> Gossiper:
        keys = [k.get_secret_value() for k in self._cfg.gossip_keys]
        own = AgentState(
            self._cfg.agent_id,
            self._cfg.dc,
            make_version(now_ms(), 0),
            slots=self._executor.slots,
        )
        config = GossipConfig(
            interval_s=self._cfg.gossip_interval_s,
            fanout=self._cfg.gossip_fanout,
            stale_s=self._cfg.gossip_stale_s,
        )
        keyring = Keyring(tuple(k.encode() for k in keys))
        return Gossiper(own, keyring, config, self._gossiped, self._rng)

    # -- membership, load, gossip --------------------------------------------------------

    def members_changed(self, changes: Mapping[str, AgentRecord | None]) -> None:
        """Agents that joined or changed (their record) or left (None): work in
        proportion to them, never to the DC."""
        self.router.update_members({a: r and member_of(r) for a, r in changes.items()})
        self.gossiper.update_members({a: r and r.gossip_address for a, r in changes.items()})
        for agent_id, record in changes.items():
            if record is None or agent_id == self._cfg.agent_id:
                continue
            if self.gossiper.table.get(agent_id) is None:
                # Until gossip speaks, the record's list is what we know.
                self.router.set_loaded(agent_id, record.models_loaded)
        metrics.MEMBERS.set(len(self.router.members))
        self.local_changed()

    def local_changed(self) -> None:
        """This agent's own load or models changed: into the router, and into gossip."""
        me, executor = self._cfg.agent_id, self._executor
        self.router.set_load(me, executor.running, executor.queued)
        self.router.set_loaded(me, self._models.present)
        self.router.set_suspect(me, False)  # a refusal of ours holds until our load moves
        running, queued = executor.by_class()
        self.gossiper.update_own(
            slots=executor.slots,
            running=running,
            queued=queued,
            free_memory_mb=executor.free_memory_mb(),
            loaded=tuple(sorted(self._models.loaded)),
            loading=tuple(sorted(self._models.loading)),
            draining=not executor.accepting,
        )
        metrics.RUNNING.set(executor.running)
        metrics.QUEUED.set(executor.queued)
        self._on_capacity()

    def _gossiped(self, state: AgentState) -> None:
        """A newer state of a peer arrived by gossip: its load and models, and it is alive."""
        running, queued = state.tasks
        self.router.set_load(state.agent_id, running, queued)
        self.router.set_loaded(state.agent_id, (*state.loaded, *state.loading))
        self.router.set_suspect(state.agent_id, False)
        self._on_capacity()

    def went_quiet(self, agent_ids: list[str]) -> None:
        for agent_id in agent_ids:
            self.router.set_suspect(agent_id, True)

    def learn(self, agent_id: str, load: peer_pb2.Load, accepted: bool) -> None:
        """A peer's reply says how loaded it is now: fresher than anything else we have.
        One that refused is de-prioritised at once, until gossip brings news of it."""
        self.router.set_load(agent_id, load.running, load.queued)
        self.router.set_loaded(agent_id, load.models_loaded)
        self.router.set_suspect(agent_id, not accepted)

    def costs(self, spec: pb.TaskSpec) -> tuple[float, float]:
        """How long a task of ``spec`` should run, and a load of its model take, as this
        agent knows them: what the router weighs a home's queue against."""
        return self._executor.expected.run_s(spec), self._models.load_s(spec.model)

    def load(self) -> peer_pb2.Load:
        """This agent's load, as every offer reply tells the sender."""
        return peer_pb2.Load(
            running=self._executor.running,
            queued=self._executor.queued,
            models_loaded=sorted(self._models.present),
        )

    # -- the applied topology ------------------------------------------------------------

    def topology_changed(self, items: Mapping[str, bytes]) -> None:
        raw = items.get(topostore.CURRENT)
        if raw is None:
            return
        try:
            applied = topostore.Applied.decode(raw, "applied topology")
        except ConfigError as exc:
            log.error("ignoring the applied topology, keeping the current one: %s", exc)
            return
        if self.topology is not None and applied.digest == self.topology.digest:
            return
        self._apply(applied)

    def _apply(self, applied: topostore.Applied) -> None:
        """Switch to a new topology as a whole: it has already been validated."""
        topology, routing = applied.topology, applied.topology.routing
        self.router.set_policy(
            Policy(
                load_factor=routing.load_factor,
                load_floor=routing.load_floor,
                ring_tries=routing.ring_tries,
                affinity_window=routing.affinity_window,
                home_slack=routing.home_slack,
            )
        )
        self.max_hops = routing.max_hops
        mine = topology.dcs.get(self._cfg.dc)
        self.overflow = tuple(Overflow(o.dc, o.weight) for o in mine.overflow) if mine else ()
        self.spill_share.max_share = mine.max_spill_share if mine else 0.0
        self._remote.set_seeds({n: dc.seeds for n, dc in topology.dcs.items() if n != self._cfg.dc})
        if self._cfg.default_queue in topology.queues:
            self._on_queues(dict(topology.queues))
        else:
            log.warning(
                "topology queues lack default_queue %r; queues unchanged", self._cfg.default_queue
            )
        weights = {**topology.gpu_weights, **self._cfg.gpu_weights}
        if weights != self.gpu_weights:
            self.gpu_weights = weights
            self._on_weights(weights)
        self._known.names = sorted(topology.dcs)
        self.topology = applied
        log.info("topology version %d applied", applied.version)


def member_of(record: AgentRecord) -> Member:
    return Member(
        agent_id=record.agent_id,
        weight=record.weight,
        gpu_memory_mb=tuple(g.memory_mb for g in record.gpus),
        pipelines=frozenset(record.pipelines),
        models=frozenset(record.models),
        draining=record.state == DRAINING,
        queue_limit=record.queue_limit,
    )
