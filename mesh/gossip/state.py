"""What is gossiped about each agent, and the table that merges it. Pure.

An entry's ``version`` is ``incarnation << 20 | counter``: one integer that grows with
every change an agent makes to its own entry and jumps when the agent restarts, so
"newest wins" is a single comparison. Only members known from etcd are ever stored
(gossip never invents a member), nobody but an agent itself can change its own entry, and
an entry not refreshed for ``stale_s`` leaves the view until it is refreshed again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

COUNTER_BITS = 20
MAX_SKEW_MS = 30_000  # a version's incarnation (its agent's start, in ms) may be this far ahead
# Most an agent's counter may move between two versions we hear: it bumps at most a few
# times a second, so even a long silence stays far below this; a bigger jump is forged.
MAX_COUNTER_JUMP = 1 << 16
# Fields of a state on the wire: 14 now, 11 from an agent before demand, model memory and
# hosted models were gossiped (a fleet is upgraded an agent at a time).
WIRE_LENGTHS = (11, 14)
MAX_MODEL_MB = 1 << 30  # a PiB of GPU memory for models: past any one agent


def make_version(incarnation_ms: int, counter: int) -> int:
    return incarnation_ms << COUNTER_BITS | (counter & ((1 << COUNTER_BITS) - 1))


def plausible(version: int, previous: int | None, now_ms: int) -> bool:
    """Whether ``version`` could be a real agent's next one: its incarnation (the agent's
    start time) not in the future, its counter not leaping past ``previous`` in the
    same incarnation. A state failing this would pin a peer's entry for ever."""
    incarnation = version >> COUNTER_BITS
    if incarnation > now_ms + MAX_SKEW_MS:
        return False
    if previous is not None and previous >> COUNTER_BITS == incarnation:
        mask = (1 << COUNTER_BITS) - 1
        return (version & mask) - (previous & mask) <= MAX_COUNTER_JUMP
    return True


def id_hash(agent_id: str) -> int:
    """A 64-bit tag for an agent id: digests carry it instead of the id itself."""
    return int.from_bytes(hashlib.blake2b(agent_id.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class AgentState:
    agent_id: str
    dc: str
    version: int
    slots: int
    running: dict[str, int] = field(default_factory=dict)  # per queue class
    queued: dict[str, int] = field(default_factory=dict)  # per queue class
    free_memory_mb: tuple[int, ...] = ()  # per idle GPU
    loaded: tuple[str, ...] = ()
    loading: tuple[str, ...] = ()
    draining: bool = False
    ts_ms: int = 0  # the agent's clock when it made this version
    demand: dict[str, float] = field(default_factory=dict)  # GPU-s/s asked per model, lately
    model_mb: int = 0  # GPU memory models may fill, MB (0: not bounded)
    hosting: tuple[str, ...] = ()  # the models it took on from the placement plan

    @property
    def tasks(self) -> tuple[int, int]:
        return sum(self.running.values()), sum(self.queued.values())

    def same_news(self, other: AgentState) -> bool:
        """Whether only the version and clock differ: a heartbeat, not a change."""
        return replace(self, version=other.version, ts_ms=other.ts_ms) == other

    def to_wire(self) -> list[object]:
        return [
            self.agent_id,
            self.dc,
            self.version,
            self.slots,
            self.running,
            self.queued,
            list(self.free_memory_mb),
            list(self.loaded),
            list(self.loading),
            self.draining,
            self.ts_ms,
            self.demand,
            self.model_mb,
            list(self.hosting),
        ]

    @classmethod
    def from_wire(cls, raw: object) -> AgentState:
        """Build from decoded msgpack; ``ValueError`` on anything malformed."""
        if not isinstance(raw, list) or len(raw) not in WIRE_LENGTHS:
            raise ValueError("agent state: expected a list of 11 or 14")
        demand: object = {}
        model_mb: object = 0
        hosting: object = []
        if len(raw) == 14:  # an agent of this version; 11: one from before placement
            *raw, demand, model_mb, hosting = raw
        agent_id, dc, version, slots, running, queued, free, loaded, loading, draining, ts = raw
        _check(isinstance(agent_id, str) and 0 < len(agent_id) <= 64, "agent id")
        _check(isinstance(dc, str) and len(dc) <= 32, "dc")
        _check(_uint(version) and _uint(slots) and slots <= 1024 and _uint(ts), "numbers")
        for counts in (running, queued):
            _check(isinstance(counts, dict) and len(counts) <= 32, "class counts")
            _check(all(isinstance(k, str) and _uint(v) for k, v in counts.items()), "counts")
        _check(isinstance(free, list) and len(free) <= 1024 and all(map(_uint, free)), "memory")
        for names in (loaded, loading):
            _check(isinstance(names, list) and len(names) <= 256, "models")
            _check(all(isinstance(n, str) and len(n) <= 128 for n in names), "model names")
        _check(isinstance(draining, bool), "draining")
        _check(isinstance(demand, dict) and len(demand) <= 256, "demand")
        _check(all(isinstance(m, str) and len(m) <= 128 and _rate(r) for m, r in demand.items()),
               "demand per model")  # fmt: skip
        _check(_uint(model_mb) and model_mb <= MAX_MODEL_MB, "model memory")
        _check(isinstance(hosting, list) and len(hosting) <= 256, "hosting")
        _check(all(isinstance(n, str) and len(n) <= 128 for n in hosting), "hosted models")
        return cls(agent_id, dc, version, slots, dict(running), dict(queued), tuple(free),
                   tuple(loaded), tuple(loading), draining, ts, dict(demand), model_mb,
                   tuple(hosting))  # fmt: skip


def _uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _rate(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1e6


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"agent state: bad {what}")


@dataclass(slots=True)
class Held:
    state: AgentState
    seen_at: float  # local clock when this version arrived
    wire: list[object]  # as received: passed on without encoding it again
    size: int = 0  # its msgpack size, once someone needed it


class GossipTable:
    """Every member's newest known state, as this agent has heard it."""

    def __init__(
        self,
        me: str,
        stale_s: float,
        on_update: Callable[[AgentState, AgentState | None], None],
    ) -> None:
        self.me = me
        self.stale_s = stale_s
        self._on_update = on_update
        self._held: OrderedDict[str, Held] = OrderedDict()  # least recently updated first
        self.members: set[str] = set()
        self.hashes: dict[str, int] = {}  # member id -> id_hash, for digests
        self.by_hash: dict[int, str] = {}

    def set_members(self, members: Iterable[str]) -> list[str]:
        """Adopt etcd's membership; return the ids whose state was dropped."""
        wanted = set(members)
        for agent_id in wanted - self.members:
            self.add_member(agent_id)
        return [a for a in self.members - wanted if self.remove_member(a)]

    def add_member(self, agent_id: str) -> None:
        if agent_id not in self.members:
            self.members.add(agent_id)
            self.hashes[agent_id] = digest = id_hash(agent_id)
            self.by_hash[digest] = agent_id

    def remove_member(self, agent_id: str) -> bool:
        """Forget a member; whether a state of it was dropped."""
        if agent_id not in self.members:
            return False
        self.members.discard(agent_id)
        self.by_hash.pop(self.hashes.pop(agent_id), None)
        return self._held.pop(agent_id, None) is not None

    def put_own(self, state: AgentState, now: float) -> None:
        self._held[state.agent_id] = Held(state, now, state.to_wire())
        self._held.move_to_end(state.agent_id)

    def merge(self, raw: object, now: float, now_ms: int, sender: str | None = None) -> bool:
        """Take a state as it came off the wire if it is about a member other than us and
        newer than ours; True if taken. Cheap checks first: most states offered are old
        news, and are dropped without being validated whole. With ``sender``, the state
        must be the sender's own. ``ValueError`` if it is malformed."""
        if not isinstance(raw, list) or len(raw) not in WIRE_LENGTHS:
            raise ValueError("agent state: expected a list of 11 or 14")
        agent_id, version = raw[0], raw[2]
        if sender is not None and agent_id != sender:
            raise ValueError("agent state: another agent's state sent as the sender's own")
        if agent_id == self.me or agent_id not in self.members or not _uint(version):
            return False
        previous = self._held.get(agent_id)
        if previous is not None and previous.state.version >= version:
            return False
        if not plausible(version, previous.state.version if previous else None, now_ms):
            raise ValueError("agent state: version from the future, or too big a jump")
        state = AgentState.from_wire(raw)
        self._held[agent_id] = Held(state, now, raw)
        self._held.move_to_end(agent_id)
        self._on_update(state, previous.state if previous else None)
        return True

    def held(self, agent_id: str) -> Held | None:
        return self._held.get(agent_id)

    def get(self, agent_id: str) -> AgentState | None:
        held = self._held.get(agent_id)
        return held.state if held else None

    def states(self) -> list[AgentState]:
        return [h.state for h in self._held.values()]

    def ids(self) -> list[str]:
        """Held ids, least recently updated first."""
        return list(self._held)

    def expire(self, now: float) -> list[str]:
        """Drop others' states not refreshed within ``stale_s``; return their ids."""
        old = []
        for agent_id, held in self._held.items():  # oldest first: stop at the first fresh one
            if now - held.seen_at <= self.stale_s:
                break
            if agent_id != self.me:
                old.append(agent_id)
        for agent_id in old:
            del self._held[agent_id]
        return old
