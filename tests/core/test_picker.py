"""The SDK's choice of agent, on its own: round robin, no agent twice in one call while
another is left, and a cooldown after a failure. Time is passed in."""

from __future__ import annotations

from mesh.sdk.picker import Picker


def test_round_robin_in_the_order_given() -> None:
    picker = Picker(("a", "b", "c"))
    assert [picker.pick(0.0) for _ in range(4)] == ["a", "b", "c", "a"]


def test_a_retry_goes_to_an_agent_the_call_has_not_tried() -> None:
    picker = Picker(("a", "b", "c"))
    assert picker.pick(0.0, tried=["a", "b"]) == "c"
    assert picker.pick(0.0, tried=["a", "b", "c"]) in {"a", "b", "c"}  # a retry beats none


def test_a_failed_agent_cools_down_then_comes_back() -> None:
    picker = Picker(("a", "b"), cooldown_s=5.0)
    picker.failed("a", now=10.0)
    assert {picker.pick(12.0) for _ in range(4)} == {"b"}
    assert "a" in {picker.pick(15.5) for _ in range(4)}


def test_the_listed_agents_replace_the_seeds_and_none_means_the_seeds() -> None:
    picker = Picker(("seed",))
    picker.update(["x", "y", "x"])
    assert picker.addresses == ["x", "y"]
    picker.update([])
    assert picker.addresses == ["seed"]


def test_when_every_listed_agent_failed_a_seed_is_tried() -> None:
    """Agents listed by names this client cannot reach (a compose fleet's own, from the
    host): the seed it came in by still serves."""
    picker = Picker(("127.0.0.1:50051",), cooldown_s=5.0)
    picker.update(["agent-1:50051", "agent-2:50051"])
    for address in picker.addresses:
        picker.failed(address, now=0.0)
    assert picker.pick(1.0) == "127.0.0.1:50051"
    assert picker.to_ask == ["agent-1:50051", "agent-2:50051", "127.0.0.1:50051"]
    assert picker.pick(6.0) in {"agent-1:50051", "agent-2:50051"}  # cooled down: back
