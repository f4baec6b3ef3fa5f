"""Membership: this agent's record in etcd under its lease, and the live view of its peers.

The record is JSON so that ``etcdctl get --prefix /gpumesh/`` is readable by an operator.
It holds what changes rarely (address, GPUs, pipelines, models, draining); load changes
every few milliseconds and travels by gossip instead.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from mesh.errors import Unavailable
from mesh.gpus import Gpu
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv
from mesh.store.mirror import PrefixMirror

log = logging.getLogger(__name__)

ACTIVE = "active"
DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class AgentRecord:
    agent_id: str
    dc: str
    address: str  # host:port of its API port (TLS, bearer tokens)
    gpus: tuple[Gpu, ...]
    weight: float
    pipelines: tuple[str, ...]
    models: tuple[str, ...]  # servable; empty means any model
    models_loaded: tuple[str, ...] = ()
    state: str = ACTIVE
    incarnation: int = 0
    queues: tuple[str, ...] = field(default=())
    queue_limit: int = 256  # its max_queue_length: with its slots, its hard limit
    gossip_address: str = ""  # host:port of its gossip UDP socket
    peer_address: str = ""  # host:port of its mTLS port: PeerService, certificate holders
    http_url: str = ""  # its HTTP/JSON API and console
    metrics_url: str = ""  # its Prometheus /metrics

    @property
    def slots(self) -> int:
        return len(self.gpus)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AgentRecord:
        data = json.loads(raw)
        data["gpus"] = tuple(Gpu(**g) for g in data["gpus"])
        for key in ("pipelines", "models", "models_loaded", "queues"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


class Registry:
    """Publishes this agent and mirrors the DC's agents prefix (a watch, never a poll)."""

    def __init__(
        self,
        store: Kv,
        keys: KeySpace,
        lease: Callable[[], int],
        on_change: Callable[[dict[str, AgentRecord | None]], None] = lambda _: None,
    ) -> None:
        """``on_change`` hears the records that changed (None: the agent left)."""
        self._kv = store
        self._keys = keys
        self.dc = keys.dc
        self._lease = lease
        self._listener = on_change
        self.me: AgentRecord | None = None
        self.peers: dict[str, AgentRecord] = {}
        self._pipelines: Counter[str] = Counter()  # agents that run each pipeline
        self.mirror = PrefixMirror(store, keys.agents, on_delta=self._on_delta)

    def _on_delta(self, delta: dict[str, bytes | None]) -> None:
        """Only the records that changed are decoded: a join costs one, not the DC's."""
        changes: dict[str, AgentRecord | None] = {}
        for name, raw in delta.items():
            record = None
            if raw is not None:
                try:
                    record = AgentRecord.from_json(raw)
                except (ValueError, TypeError, KeyError) as exc:
                    log.warning("ignoring unreadable agent record %s: %s", name, exc)
            old = self.peers.pop(name, None) if record is None else self.peers.get(name)
            if record is None and old is None:
                continue
            if old is not None:
                self._pipelines.subtract(old.pipelines)
            if record is not None:
                self.peers[name] = record
                self._pipelines.update(record.pipelines)
            changes[name] = record
        if changes:
            self._listener(changes)

    def pipelines(self) -> set[str]:
        """The pipelines some agent of the DC runs (kept as records come and go)."""
        return {name for name, agents in self._pipelines.items() if agents > 0}

    async def publish(self, record: AgentRecord) -> None:
        self.me = record
        try:
            await self._kv.put(self._keys.agent(record.agent_id), record.to_json(), self._lease())
        except Unavailable as exc:
            raise Unavailable(f"cannot register in etcd: {exc}") from exc
