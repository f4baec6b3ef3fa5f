"""An in-memory network of gossipers on a simulated clock, with seeded loss and delay.

The same ``Gossiper`` code as on UDP, driven by a discrete-event loop instead of sockets
and sleeps: tests check convergence and loss deterministically, and ``bench gossip``
simulates a thousand agents in a few seconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.errors import BadPacket
from mesh.gossip.protocol import GossipConfig, Gossiper
from mesh.gossip.state import AgentState, make_version
from mesh.gossip.wire import Keyring

KEYRING = Keyring((b"in-memory gossip test key",))
EPOCH_MS = 1_800_000_000_000


@dataclass
class Network:
    """Agents ``a0000``.. on one simulated DC; addresses are the agent ids."""

    size: int
    seed: int = 1
    drop_rate: float = 0.0
    delay_s: tuple[float, float] = (0.0002, 0.002)
    config: GossipConfig = field(default_factory=GossipConfig)
    now: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self.seen: dict[str, dict[str, int]] = {}  # observer -> agent -> version seen
        self.watch: Callable[[str, AgentState, float], None] = lambda *_: None
        self.agents: dict[str, Gossiper] = {}
        ids = [f"a{i:04d}" for i in range(self.size)]
        for agent_id in ids:
            own = AgentState(agent_id, "sim", make_version(EPOCH_MS, 0), slots=2)
            self.agents[agent_id] = Gossiper(
                own,
                KEYRING,
                self.config,
                self._observer(agent_id),
                random.Random(self.rng.random()),
            )
        for gossiper in self.agents.values():
            gossiper.set_members({a: a for a in ids})
            # Random phases, as real agents started at different times.
            self._at(self.rng.random() * self.config.interval_s, "tick", gossiper.me)

    def _observer(self, observer: str) -> Callable[[AgentState], None]:
        def seen(state: AgentState) -> None:
            self.watch(observer, state, self.now)

        return seen

    def _at(self, when: float, kind: str, data: object) -> None:
        heapq.heappush(self._events, (when, next(self._seq), kind, data))

    @property
    def now_ms(self) -> int:
        return EPOCH_MS + int(self.now * 1000)

    def run_until(self, end: float, stop: Callable[[], bool] = lambda: False) -> None:
        while self._events and self._events[0][0] <= end and not stop():
            self.now, _, kind, data = heapq.heappop(self._events)
            if kind == "tick":
                gossiper = self.agents[data]  # type: ignore[index]
                datagrams, _ = gossiper.tick(self.now, self.now_ms)
                self._send(datagrams)
                self._at(self.now + self.config.interval_s, "tick", data)
            else:
                address, payload = data  # type: ignore[misc]
                try:
                    replies = self.agents[address].receive(payload, self.now, self.now_ms)
                except BadPacket as exc:
                    self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
                    continue
                self._send(replies)

    def _send(self, datagrams: list[tuple[str, bytes]]) -> None:
        for address, payload in datagrams:
            if self.rng.random() < self.drop_rate:
                self.dropped["lost"] = self.dropped.get("lost", 0) + 1
                continue
            self._at(self.now + self.rng.uniform(*self.delay_s), "datagram", (address, payload))

    def bytes_sent(self) -> int:
        return sum(g.sent_bytes for g in self.agents.values())
