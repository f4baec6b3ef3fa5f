"""Gossip without sockets: the same Gossiper code on an in-memory network with a
simulated clock and seeded loss, and every kind of bad datagram against the wire rules."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import BadPacket
from mesh.gossip.memory import EPOCH_MS, KEYRING, Network
from mesh.gossip.protocol import GossipConfig
from mesh.gossip.state import AgentState, GossipTable, make_version
from mesh.gossip.wire import MAC_BYTES, Keyring, Kind, decode, encode


def converged(net: Network) -> bool:
    """Every agent holds every other agent's current version."""
    return all(
        (held := g.table.get(other.me)) is not None and held.version == other.own.version
        for g in net.agents.values()
        for other in net.agents.values()
        if other is not g
    )


def spread_time(net: Network, agent_id: str, within_s: float = 10.0) -> dict[str, float]:
    """Change ``agent_id``'s load now; return when each other agent first saw it."""
    start = net.now
    seen: dict[str, float] = {}

    def watch(observer: str, state: AgentState, now: float) -> None:
        if state.agent_id == agent_id and state.queued == {"vip": 7}:
            seen.setdefault(observer, now - start)

    net.watch = watch
    net.agents[agent_id].update_own(queued={"vip": 7})
    net.run_until(start + within_s, stop=lambda: len(seen) == len(net.agents) - 1)
    return seen


def test_a_dc_converges_and_a_change_reaches_everyone() -> None:
    net = Network(40, seed=1)
    net.run_until(3.0)
    assert converged(net)
    seen = spread_time(net, "a0007")
    assert len(seen) == 39


@pytest.mark.parametrize("loss", [0.2, 0.5])
def test_a_change_gets_through_packet_loss(loss: float) -> None:
    net = Network(30, seed=2, drop_rate=loss)
    net.run_until(5.0)
    assert len(spread_time(net, "a0003", within_s=20.0)) == 29
    assert net.dropped["lost"] > 0


def test_every_datagram_stays_under_the_size_limit() -> None:
    config = GossipConfig(max_datagram=600)
    net = Network(60, seed=3, config=config)
    sizes: list[int] = []
    send = net._send

    def measured(datagrams: list[tuple[str, bytes]]) -> None:
        sizes.extend(len(d) for _, d in datagrams)
        send(datagrams)

    net._send = measured  # type: ignore[method-assign]
    net.run_until(3.0)
    assert sizes and max(sizes) <= 600
    assert not net.dropped  # and nothing was refused as oversized


def test_a_member_that_leaves_etcd_is_forgotten() -> None:
    net = Network(10, seed=4)
    net.run_until(2.0)
    ids = list(net.agents)
    survivor = net.agents[ids[0]]
    gone = survivor.set_members({a: a for a in ids if a != ids[5]})
    assert gone == [ids[5]] and survivor.table.get(ids[5]) is None
    net.run_until(4.0)  # others still gossip about it: never taken back
    assert survivor.table.get(ids[5]) is None


def test_a_silent_member_ages_out_of_the_view() -> None:
    config = GossipConfig(stale_s=1.0, heartbeat_s=0.3)
    net = Network(8, seed=5, config=config)
    net.run_until(2.0)
    quiet = "a0002"
    net.agents[quiet].tick = lambda now, now_ms: ([], [])  # type: ignore[method-assign]
    net.agents[quiet].receive = lambda *a: []  # type: ignore[method-assign]
    net.run_until(5.0)
    assert all(g.table.get(quiet) is None for a, g in net.agents.items() if a != quiet)
    assert all(g.table.get("a0003") is not None for a, g in net.agents.items() if a != "a0003")


# -- the wire: every bad datagram is refused with its reason -----------------------------

NOW_MS = EPOCH_MS + 5_000


def frame(
    kind: Kind = Kind.SYN,
    seq: int = 1,
    ts_ms: int = NOW_MS,
    keyring: Keyring = KEYRING,
    sender: str = "a0001",
    payload: dict | None = None,
    incarnation: int = EPOCH_MS,
    version: int = make_version(EPOCH_MS, 1),
) -> bytes:
    own = AgentState(sender, "sim", version, slots=1).to_wire()
    body = payload if payload is not None else {"own": own, "digest": b"", "states": []}
    return encode(keyring, kind, sender, incarnation, seq, ts_ms, body)


def reason(data: bytes) -> str:
    net = Network(3, seed=6)
    with pytest.raises(BadPacket) as caught:
        net.agents["a0000"].receive(data, 5.0, NOW_MS)
    return caught.value.reason


def with_kind(data: bytes, kind: int) -> bytes:
    """A correctly signed datagram of an unknown kind."""
    signed = data[:3] + bytes([kind]) + data[4:-MAC_BYTES]
    return signed + KEYRING.sign(signed)


def resign(data: bytes, body: bytes) -> bytes:
    signed = data[:4] + body
    return signed + KEYRING.sign(signed)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: frame() + b"x" * 1400, "oversized"),
        (lambda: b"GM\x01", "short"),
        (lambda: b"XX" + frame()[2:], "not gossip"),
        (lambda: frame()[:2] + b"\x09" + frame()[3:], "wire version"),
        (lambda: frame()[:-1] + bytes([frame()[-1] ^ 1]), "bad mac"),
        (lambda: frame(keyring=Keyring((b"some other secret key",))), "bad mac"),
        (lambda: resign(frame(), b"\xc1\xc1 not msgpack"), "malformed"),
        (lambda: resign(frame(), msgpack.packb([1, 2, 3])), "malformed"),
        (lambda: frame(kind=Kind.SYN, payload={"own": [1, 2], "digest": b""}), "malformed"),
        (
            lambda: frame(
                payload={"own": AgentState("a0002", "sim", 9, 1).to_wire(), "digest": b""}
            ),
            "malformed",
        ),
        (lambda: frame(payload={"own": [], "digest": b"\x00" * 15}), "malformed"),
        (lambda: frame(sender="stranger"), "unknown sender"),
        (lambda: frame(ts_ms=NOW_MS - 60_000), "stale"),
        (lambda: frame(incarnation=NOW_MS + 31_000), "incarnation from the future"),
        (lambda: frame(version=make_version(NOW_MS + 31_000, 1)), "malformed"),
        (lambda: with_kind(frame(), 99), "malformed"),
    ],
)
def test_bad_datagrams_are_refused_with_a_reason(make, why: str) -> None:
    assert reason(make()) == why


def test_a_version_that_leaps_ahead_is_refused() -> None:
    """Accepting it would pin the sender's entry: no real version would ever be newer."""
    net = Network(3, seed=8)
    agent = net.agents["a0000"]
    agent.receive(frame(seq=1, version=make_version(EPOCH_MS, 5)), 5.0, NOW_MS)
    leap = frame(seq=2, version=make_version(EPOCH_MS, 5 + (1 << 17)))
    with pytest.raises(BadPacket, match="malformed"):
        agent.receive(leap, 5.1, NOW_MS)
    assert agent.table.get("a0001").version == make_version(EPOCH_MS, 5)  # type: ignore[union-attr]


def test_without_the_key_nobody_joins_or_changes_anything() -> None:
    """A sender with another key, even one that names a member, is dropped before a
    byte of its payload is read: it can neither join nor change any state."""
    net = Network(4, seed=9)
    net.run_until(3.0)
    before = {a: {s.agent_id: s.version for s in g.table.states()} for a, g in net.agents.items()}
    outsider = Keyring((b"a key that is not the mesh's",))
    for sender in ("a0001", "intruder"):
        lie = AgentState(sender, "sim", make_version(NOW_MS, 999), slots=64).to_wire()
        forged = {"own": lie, "digest": b"", "states": [lie]}
        data = frame(keyring=outsider, sender=sender, payload=forged)
        for agent in net.agents.values():
            with pytest.raises(BadPacket, match="bad mac"):
                agent.receive(data, 3.0, NOW_MS)
    after = {a: {s.agent_id: s.version for s in g.table.states()} for a, g in net.agents.items()}
    assert after == before and all("intruder" not in held for held in after.values())


def test_a_replayed_datagram_is_refused() -> None:
    net = Network(3, seed=7)
    agent = net.agents["a0000"]
    data = frame(seq=5)
    agent.receive(data, 5.0, NOW_MS)
    with pytest.raises(BadPacket, match="replayed"):
        agent.receive(data, 5.1, NOW_MS)
    agent.receive(frame(seq=4), 5.2, NOW_MS)  # late but not seen: accepted
    agent.receive(frame(seq=70), 5.3, NOW_MS)
    with pytest.raises(BadPacket, match="replayed"):
        agent.receive(frame(seq=3), 5.4, NOW_MS)  # fell out of the window


def test_a_frame_claiming_a_newer_incarnation_does_not_silence_the_real_one() -> None:
    """One keyed frame with a newer incarnation made a peer drop all of the real agent's
    gossip as replayed for as long as it ran."""
    net = Network(3, seed=7)
    agent = net.agents["a0000"]
    agent.receive(frame(seq=1), 5.0, NOW_MS)
    agent.receive(frame(seq=1, incarnation=NOW_MS), 5.1, NOW_MS)  # the forged one
    agent.receive(frame(seq=2), 5.2, NOW_MS)  # the real incarnation goes on
    with pytest.raises(BadPacket, match="replayed"):
        agent.receive(frame(seq=2), 5.3, NOW_MS)  # and its replays are still dropped


def test_key_rotation_accepts_old_and_new_while_both_are_listed() -> None:
    old, new = b"the old gossip key!!", b"the new gossip key!!"
    rotating = Keyring((new, old))
    data_old = encode(Keyring((old,)), Kind.DELTA, "a", 1, 1, NOW_MS, {"states": []})
    data_new = encode(rotating, Kind.DELTA, "a", 1, 2, NOW_MS, {"states": []})
    assert decode(rotating, data_old).seq == 1
    assert decode(rotating, data_new).seq == 2
    with pytest.raises(BadPacket, match="bad mac"):
        decode(Keyring((old,)), data_new)  # signed with the new key: the old ring refuses
    with pytest.raises(ValueError, match="16 bytes"):
        Keyring((b"short",))


# -- the merge rule, as properties ----------------------------------------------------------

PEERS = ["p1", "p2", "p3"]
offered = st.lists(
    st.tuples(st.sampled_from(PEERS), st.integers(1, 50), st.integers(0, 8)), max_size=30
)


def table_after(states: list[tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """Merge ``(agent, version, running)`` states into a fresh table, in the given order;
    what it holds: agent -> (version, running)."""
    table = GossipTable("me", stale_s=60, on_update=lambda *_: None)
    table.set_members(["me", *PEERS])
    for agent, version, running in states:
        state = AgentState(agent, "dc", version, slots=2, running={"normal": running})
        table.merge(state.to_wire(), now=0.0, now_ms=0)
    return {s.agent_id: (s.version, s.tasks[0]) for s in table.states()}


@given(offered, st.randoms())
def test_merge_is_order_free_and_the_newest_version_wins(states, rng) -> None:
    # Versions are unique per agent, as an agent never reuses one for another state.
    unique = list({(a, v): (a, v, r) for a, v, r in states}.values())
    shuffled = list(unique)
    rng.shuffle(shuffled)
    held = table_after(unique)
    assert held == table_after(shuffled)
    for agent in {a for a, _, _ in unique}:
        newest = max((v, r) for a, v, r in unique if a == agent)
        assert held[agent] == newest


@given(offered)
def test_merging_the_same_states_again_changes_nothing(states) -> None:
    unique = list({(a, v): (a, v, r) for a, v, r in states}.values())
    assert table_after(unique + unique) == table_after(unique)
    heard: list[str] = []
    table = GossipTable("me", stale_s=60, on_update=lambda state, _: heard.append(state.agent_id))
    table.set_members(["me", *PEERS])
    wires = [AgentState(a, "dc", v, slots=2).to_wire() for a, v, _ in unique]
    for wire in wires:
        table.merge(wire, now=0.0, now_ms=0)
    news = len(heard)
    assert not any(table.merge(wire, now=1.0, now_ms=0) for wire in wires)  # old news now
    assert len(heard) == news


def test_demand_and_model_memory_ride_along_and_an_older_agents_state_still_parses() -> None:
    state = AgentState(
        "a0001", "sim", 9, 1, demand={"sdxl": 0.5}, model_mb=80_000, hosting=("sdxl",)
    )
    assert AgentState.from_wire(state.to_wire()) == state
    older = state.to_wire()[:11]  # an agent from before demand was gossiped
    assert AgentState.from_wire(older) == AgentState("a0001", "sim", 9, 1)
    for bad_demand, bad_mb in (({"m": -1.0}, 0), ({"m": float("inf")}, 0), ({}, -1),
                               ({}, 1 << 40), ({f"m{i}": 1.0 for i in range(300)}, 0)):  # fmt: skip
        hostile = [*older, bad_demand, bad_mb, []]
        with pytest.raises(ValueError, match="agent state"):
            AgentState.from_wire(hostile)
