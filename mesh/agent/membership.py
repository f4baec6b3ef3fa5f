"""This agent as a member of its DC: its lease session and its record in the registry.

The record says where the agent listens, what it can run and what it has loaded, and is
bound to the lease, so it vanishes when the agent dies. A lost lease means the DC thinks
this agent dead: ``renew`` opens a new session and publishes the record again as a new
incarnation (the agent drops its work first: ``Agent``). Every part that writes under
the lease reads it through ``lease_id``, so a new session is followed at once.
"""

from __future__ import annotations

import logging

from mesh.agent.duties import Duties
from mesh.agent.events import Events
from mesh.agent.history import History
from mesh.agent.slots import GpuSlots
from mesh.config import AgentConfig
from mesh.core.clock import now_ms
from mesh.errors import Unavailable
from mesh.gpus import weight_of
from mesh.pipelines import Models
from mesh.store.dc import DcStore
from mesh.store.registry import ACTIVE, DRAINING, AgentRecord
from mesh.store.session import Session

log = logging.getLogger(__name__)


class Membership:
    def __init__(
        self,
        cfg: AgentConfig,
        store: DcStore,
        history: History,
        events: Events,
        duties: Duties,
        slots: GpuSlots,
        pipelines: list[str],
        models: Models,
    ) -> None:
        self._cfg = cfg
        self.agent_id = cfg.agent_id
        self._store = store
        self._history = history
        self._duties = duties
        self._slots = slots
        self._gpus = slots.gpus
        self._events = events
        self._pipelines = tuple(sorted(pipelines))
        self._models = models
        self.session = self._new_session()
        self.registry = store.registry(self.lease_id, events.members.emit)
        self.weights = dict(cfg.gpu_weights)  # the GPU classes' weights the topology sets
        self.incarnation = 0
        self.address = ""  # the API port, set once bound
        self.peer_address = ""  # the mTLS port
        self.http_url = ""  # set by the server once its HTTP port is bound
        self.metrics_url = ""  # set by the process once /metrics is served
        self.gossip_address = ""
        self.queues = dict(cfg.queues)  # the queue classes the topology sets now
        self.stopping = False  # set for good once the agent begins to stop
        events.republish.connect(self.republish_soon)
        events.queues.connect(self._queues_changed)

    def lease_id(self) -> int:
        return self.session.lease_id

    def _new_session(self) -> Session:
        def on_state(state: str) -> None:
            self._history.write("lease", state, lease=self.session.lease_id)

        cfg = self._cfg
        return self._store.session(cfg.lease_ttl_s, cfg.etcd_outage_grace_s, on_state)

    async def open(self) -> None:
        """A lease for this incarnation; ``publish`` then registers under it."""
        await self.session.open()
        self.incarnation = now_ms()

    async def renew(self) -> None:
        """Give up the lost lease and open a new one, as a new incarnation."""
        await self.session.close(revoke=False)
        self.session = self._new_session()
        await self.open()

    def record(self, state: str = ACTIVE) -> AgentRecord:
        cfg = self._cfg
        return AgentRecord(
            agent_id=cfg.agent_id,
            dc=cfg.dc,
            address=self.address,
            gpus=tuple(self._gpus),
            weight=weight_of(self._gpus, self.weights),
            pipelines=self._pipelines,
            models=tuple(cfg.models),
            models_loaded=tuple(sorted(self._models.loaded)),
            state=state,
            incarnation=self.incarnation,
            queues=tuple(self.queues),
            queue_limit=cfg.max_queue_length,
            gossip_address=self.gossip_address,
            peer_address=self.peer_address,
            http_url=self.http_url,
            metrics_url=self.metrics_url,
        )

    @property
    def state(self) -> str:
        """The state last published (ACTIVE before any)."""
        return self.registry.me.state if self.registry.me else ACTIVE

    async def publish(self, state: str | None = None) -> AgentRecord:
        """Publish the record in ``state`` (the one it has, by default)."""
        record = self.record(state or self.state)
        await self.registry.publish(record)
        return record

    async def drain(self) -> AgentRecord:
        """Take no new tasks (peers see it draining); the ones here run to their end."""
        self._slots.accepting = False
        return await self.publish(DRAINING)

    async def undrain(self) -> AgentRecord:
        """Take work again after a drain (not after a stop: that one is for good)."""
        if self.stopping:
            raise Unavailable("the agent is shutting down")
        self._slots.accepting = True
        record = await self.publish(ACTIVE)
        self._events.local.emit()
        return record

    def _queues_changed(self, queues: dict[str, int]) -> None:
        self.queues = dict(queues)  # published with the next change of the record

    def weights_changed(self, weights: dict[str, float]) -> None:
        self.weights = weights
        self.republish_soon()

    def republish_soon(self) -> None:
        """Publish the record again in the background (loaded models, weight changed)."""
        if self.registry.me is not None:
            self._duties.spawn("republish", self._republish())

    async def _republish(self) -> None:
        try:
            await self.publish()
        except Unavailable as exc:
            log.warning("could not update agent record: %s", exc)
