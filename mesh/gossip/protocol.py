"""Push-pull gossip rounds, as pure functions of time and input: ``tick`` and ``receive``
return the datagrams to send, and never touch a socket or a clock.

Every ``interval_s`` an agent sends a SYN to ``fanout`` random members of its DC. A SYN
carries the sender's own state, the freshest news it has (see below), and a digest of part
of its table (id hash, version), a different part each round: the anti-entropy that
repairs what loss and churn let slip. The receiver answers with an ACK: its own state, the
states it holds newer than the digest says, its news, and the ids it wants because the
digest shows them newer; a DELTA answers those wants.

News is memberlist's piggybacking: a change this agent has just learned is passed on in
its next datagrams, fewest-sent first, until it has gone out ``retransmit_mult`` x
log10(N) times, so it spreads in O(log N) rounds. Heartbeats are not news: an agent bumps
its own version at least every ``heartbeat_s`` so that a silent member can be told from a
stale entry, and those versions travel by the digests, which always offer the entries
least recently refreshed. Every datagram stays under ``max_datagram`` bytes, so the bytes
an agent sends are bounded by ``fanout`` and the interval, not by the size of the DC.
"""

from __future__ import annotations

import bisect
import math
import random
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from mesh.errors import BadPacket
from mesh.gossip.state import COUNTER_BITS, AgentState, GossipTable, make_version
from mesh.gossip.wire import (
    MAX_DATAGRAM,
    Frame,
    Keyring,
    Kind,
    ReplayGuard,
    body_size,
    decode,
    encode,
    packed_size,
)

Datagram = tuple[str, bytes]  # (address, bytes)
_DIGEST_ENTRY = struct.Struct(">QQ")  # id hash, version
_HASH = struct.Struct(">Q")
DIGEST_ENTRIES = 40  # per SYN: leaves room for a few states of news
MAX_WANTS = 32
NEWS_CAP = 64  # news beyond this drops the most-sent first: fresh news must get through


@dataclass(frozen=True, slots=True)
class GossipConfig:
    interval_s: float = 0.2
    fanout: int = 3
    stale_s: float = 8.0
    heartbeat_s: float = 2.0
    retransmit_mult: int = 3
    max_datagram: int = MAX_DATAGRAM


class Gossiper:
    def __init__(
        self,
        own: AgentState,
        keyring: Keyring,
        config: GossipConfig,
        on_update: Callable[[AgentState], None],
        rng: random.Random,
    ) -> None:
        self.config = config
        self.keyring = keyring
        self.rng = rng
        self.incarnation = own.version >> COUNTER_BITS
        self.table = GossipTable(own.agent_id, config.stale_s, self._learned(on_update))
        self._peer_ids: list[str] = []
        self.guard = ReplayGuard()
        self._own = own
        self._counter = own.version & ((1 << COUNTER_BITS) - 1)
        self._last_bump = float("-inf")
        self._dirty = True
        self._seq = 0
        self._turn = 0
        self._peers: dict[str, str] = {}  # member id -> gossip address
        self._news: dict[str, int] = {}  # id of a changed state -> times sent
        self.sent_bytes = 0

    def _learned(
        self, on_update: Callable[[AgentState], None]
    ) -> Callable[[AgentState, AgentState | None], None]:
        def learned(state: AgentState, previous: AgentState | None) -> None:
            if previous is None or not previous.same_news(state):
                self._news[state.agent_id] = 0
                if len(self._news) > 2 * NEWS_CAP:
                    keep = sorted(self._news.items(), key=lambda item: item[1])[:NEWS_CAP]
                    self._news = dict(keep)
            on_update(state)

        return learned

    @property
    def me(self) -> str:
        return self._own.agent_id

    @property
    def own(self) -> AgentState:
        return self._own

    # -- inputs from the agent -------------------------------------------------------------

    def set_members(self, addresses: dict[str, str]) -> list[str]:
        """etcd's members of the DC and their gossip addresses; returns ids dropped."""
        changes: dict[str, str | None] = dict(addresses)
        changes.update(dict.fromkeys(self.table.members - addresses.keys() - {self.me}))
        return self.update_members(changes)

    def update_members(self, changes: Mapping[str, str | None]) -> list[str]:
        """Members that joined or moved (their gossip address; empty: one that does not
        gossip) or left (None), in work proportional to them; returns ids dropped."""
        self.table.add_member(self.me)
        gone = []
        for agent_id, address in changes.items():
            if agent_id == self.me:
                continue
            if address is not None:
                self.table.add_member(agent_id)
            elif self.table.remove_member(agent_id):
                gone.append(agent_id)
            if address:
                if agent_id not in self._peers:
                    bisect.insort(self._peer_ids, agent_id)
                self._peers[agent_id] = address
            elif self._peers.pop(agent_id, None) is not None:
                del self._peer_ids[bisect.bisect_left(self._peer_ids, agent_id)]
        self.guard.forget(gone)
        for agent_id in gone:
            self._news.pop(agent_id, None)
        return gone

    def update_own(self, **changes: object) -> None:
        """Change this agent's state; the next tick publishes it as a new version."""
        updated = replace(self._own, **changes)  # type: ignore[arg-type]
        if updated != self._own:
            self._own = updated
            self._dirty = True

    # -- rounds ----------------------------------------------------------------------------

    def tick(self, now: float, now_ms: int) -> tuple[list[Datagram], list[str]]:
        """One round: the SYNs to send, and the ids whose state just went stale."""
        if self._dirty or now - self._last_bump >= self.config.heartbeat_s:
            self._counter += 1
            version = make_version(self.incarnation, self._counter)
            self._own = replace(self._own, version=version, ts_ms=now_ms)
            self._last_bump, self._dirty = now, False
            self.table.put_own(self._own, now)
        stale = self.table.expire(now)
        for agent_id in stale:
            self._news.pop(agent_id, None)
        peers = self._peer_ids
        targets = self.rng.sample(peers, min(self.config.fanout, len(peers)))
        self._turn += 1
        if not targets:
            return [], stale
        payload: dict[str, object] = {"own": self._own.to_wire(), "digest": b""}
        room = self.config.max_datagram - body_size({**payload, "states": []}) - 8
        payload["digest"] = self._digest(min(DIGEST_ENTRIES, room // _DIGEST_ENTRY.size))
        syn = self._pack(Kind.SYN, payload, now_ms)  # one datagram: guards are per receiver
        self.sent_bytes += len(syn) * len(targets)
        return [(self._peers[p], syn) for p in targets], stale

    def _digest(self, entries: int) -> bytes:
        """The entries least recently refreshed: those most in need of a newer version."""
        chosen: list[str] = []
        for agent_id in self.table.ids():
            if len(chosen) >= entries:
                break
            if agent_id != self.me:
                chosen.append(agent_id)
        get = self.table.get
        return b"".join(
            _DIGEST_ENTRY.pack(self.table.hashes[a], get(a).version)  # type: ignore[union-attr]
            for a in chosen
        )

    def _frame(self, kind: Kind, payload: dict[str, object], now_ms: int) -> bytes:
        self._seq += 1
        return encode(self.keyring, kind, self.me, self.incarnation, self._seq, now_ms, payload)

    def _pack(
        self, kind: Kind, payload: dict[str, object], now_ms: int, first: Sequence[str] = ()
    ) -> bytes:
        """``payload`` plus the states of ``first``, then news, as many as fit a datagram."""
        chosen: list[object] = []
        room = self.config.max_datagram - body_size({**payload, "states": []})
        news = sorted(self._news, key=self._news.__getitem__)
        sent_news = []
        for agent_id in dict.fromkeys([*first, *news]):
            held = self.table.held(agent_id)
            if held is None or agent_id == self.me:
                continue
            if not held.size:
                held.size = packed_size(held.wire)
            size = held.size
            if size > room:
                break
            chosen.append(held.wire)
            room -= size
            if agent_id in self._news:
                sent_news.append(agent_id)
        limit = self.config.retransmit_mult * max(1, math.ceil(math.log10(len(self._peers) + 2)))
        for agent_id in sent_news:
            self._news[agent_id] += 1
            if self._news[agent_id] >= limit:
                del self._news[agent_id]
        return self._frame(kind, {**payload, "states": chosen}, now_ms)

    # -- receiving -------------------------------------------------------------------------

    def receive(self, data: bytes, now: float, now_ms: int) -> list[Datagram]:
        """Handle one datagram; ``BadPacket`` says why it was dropped."""
        frame = decode(self.keyring, data, self.config.max_datagram)
        if frame.sender not in self._peers:
            raise BadPacket("unknown sender")
        self.guard.accept(frame, now_ms)
        try:
            replies = self._handle(frame, self._peers[frame.sender], now, now_ms)
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            raise BadPacket("malformed") from exc
        self.sent_bytes += sum(len(d) for _, d in replies)
        return replies

    def _handle(self, frame: Frame, reply_to: str, now: float, now_ms: int) -> list[Datagram]:
        p = frame.payload
        if frame.kind in (Kind.SYN, Kind.ACK):
            self.table.merge(p["own"], now, now_ms, sender=frame.sender)
        self._merge_all(p.get("states", []), now, now_ms)
        if frame.kind == Kind.SYN:
            return [(reply_to, self._ack(_digest(p["digest"]), now_ms))]
        if frame.kind == Kind.ACK:
            wants = _hashes(p["want"])
            ids = [self.table.by_hash[h] for h in wants if h in self.table.by_hash]
            if not ids:
                return []
            return [(reply_to, self._pack(Kind.DELTA, {}, now_ms, ids))]
        if frame.kind == Kind.DELTA:
            return []
        raise BadPacket("unexpected kind")

    def _merge_all(self, raws: object, now: float, now_ms: int) -> None:
        if not isinstance(raws, list):
            raise BadPacket("malformed")
        for raw in raws:
            self.table.merge(raw, now, now_ms)

    def _ack(self, digest: dict[int, int], now_ms: int) -> bytes:
        newer, want = [], []
        for h, version in digest.items():
            agent_id = self.table.by_hash.get(h)
            if agent_id is None or agent_id == self.me:
                continue
            held = self.table.get(agent_id)
            if held is None or version > held.version:
                want.append(h)
            elif held.version > version:
                newer.append(agent_id)
        payload: dict[str, object] = {
            "own": self._own.to_wire(),
            "want": b"".join(_HASH.pack(h) for h in want[:MAX_WANTS]),
        }
        return self._pack(Kind.ACK, payload, now_ms, newer)


def _digest(raw: object) -> dict[int, int]:
    if not isinstance(raw, bytes) or len(raw) % _DIGEST_ENTRY.size:
        raise BadPacket("malformed")
    return dict(_DIGEST_ENTRY.iter_unpack(raw))


def _hashes(raw: object) -> set[int]:
    if not isinstance(raw, bytes) or len(raw) % _HASH.size:
        raise BadPacket("malformed")
    return {h for (h,) in _HASH.iter_unpack(raw)}
