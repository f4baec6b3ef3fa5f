"""An agent's ports: how it reaches the world, and the real adapters of each.

The DC's store (``DcStore`` over etcd), peers (``PeerClients``, gRPC), gossip
(``GossipNode``, UDP), the source of its random choices; the clock is a context variable
(``mesh.core.clock``). ``real_ports`` builds them from the agent's configuration; the
simulator (``sim.mesh``) builds simulated ones, and the composition root
(``mesh.agent.compose``) wires the same parts over either.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh.agent.peers import PeerClients, Peers
from mesh.channels import Security
from mesh.config import AgentConfig
from mesh.gossip.protocol import Gossiper
from mesh.gossip.transport import GossipNode
from mesh.store.dc import DcStore
from mesh.store.keys import KeySpace


class Gossip(Protocol):
    """The gossip transport: ``GossipNode`` (UDP), or the simulator's."""

    async def start(self) -> str:
        """Listen; the address it listens on."""

    async def run(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Ports:
    """How an agent reaches the world: its DC's store, its peers, its gossip transport
    (made for its gossiper and what to tell when peers go quiet), the source of its
    random choices (seeded in a simulation), and whether it has a disk for results too
    big for a record (a simulated agent has none: nothing leaves the event loop)."""

    store: DcStore
    peers: Peers
    gossip: Callable[[Gossiper, Callable[[list[str]], None]], Gossip]
    rng: random.Random
    disk: bool = True


def security_of(cfg: AgentConfig) -> Security:
    if cfg.insecure:
        return Security(cfg.mesh_name, insecure=True)
    return Security.from_files(cfg.mesh_name, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)


def real_ports(cfg: AgentConfig) -> Ports:
    """etcd, gRPC and UDP, as ``cfg`` says to reach them."""
    security = security_of(cfg)
    keys = KeySpace(cfg.prefix, cfg.dc)
    store = DcStore.connect_to(
        cfg.etcd_endpoints, security, keys, cfg.task_retention_s, cfg.max_deadline_s
    )

    def gossip(gossiper: Gossiper, on_stale: Callable[[list[str]], None]) -> Gossip:
        return GossipNode(gossiper, cfg.gossip_listen, on_stale, drop_rate=cfg.gossip_drop_rate)

    return Ports(store, PeerClients(security, cfg.max_message_bytes), gossip, random.Random())
