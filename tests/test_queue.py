"""The queue discipline, driven by an explicit clock: weights, interleaving, aging, bounds."""

from __future__ import annotations

from collections import Counter

import pytest

from mesh.core.queue import WeightedQueue
from mesh.errors import InvalidTask, LimitExceeded


def filled(per_class: int, aging_s: float = 1e9) -> WeightedQueue[str]:
    q: WeightedQueue[str] = WeightedQueue({"vip": 8, "normal": 2}, 10_000, aging_s)
    for i in range(per_class):
        q.push("vip", f"vip-{i}", now=0.0)
        q.push("normal", f"normal-{i}", now=0.0)
    return q


def test_weights_share_the_pops_8_to_2_while_both_wait() -> None:
    q = filled(100)
    taken = [q.pop(now=0.0) for _ in range(50)]
    assert Counter(t.split("-")[0] for t in taken if t) == {"vip": 40, "normal": 10}


def test_classes_interleave_rather_than_burst() -> None:
    q = filled(20)
    first_ten = [q.pop(now=0.0) for _ in range(10)]
    normals = [i for i, t in enumerate(first_ten) if t and t.startswith("normal")]
    assert len(normals) == 2
    assert normals[1] - normals[0] >= 3


def test_order_within_a_class_is_fifo() -> None:
    q = filled(5)
    vips = [t for t in (q.pop(now=0.0) for _ in range(10)) if t and t.startswith("vip")]
    assert vips == [f"vip-{i}" for i in range(5)]


def test_a_rerun_goes_first_in_its_class() -> None:
    q: WeightedQueue[str] = WeightedQueue({"normal": 1}, 10, aging_s=1e9)
    q.push("normal", "young", now=5.0)
    q.push("normal", "rerun", now=9.0, first=True)
    assert [q.pop(now=10.0), q.pop(now=10.0)] == ["rerun", "young"]


def test_a_lone_class_takes_every_pop() -> None:
    q: WeightedQueue[str] = WeightedQueue({"vip": 8, "normal": 2}, 100, 1e9)
    for i in range(5):
        q.push("normal", f"n{i}", now=0.0)
    assert [q.pop(now=0.0) for _ in range(5)] == [f"n{i}" for i in range(5)]


def test_aging_bounds_the_wait_of_a_light_class() -> None:
    q: WeightedQueue[str] = WeightedQueue({"vip": 1000, "normal": 1}, 10_000, aging_s=30.0)
    q.push("normal", "old", now=0.0)
    for i in range(100):
        q.push("vip", f"v{i}", now=10.0)
    assert q.pop(now=29.0) == "v0"  # before the bound, weight rules
    assert q.pop(now=30.0) == "old"  # at the bound, the oldest head goes first


def test_a_head_that_does_not_fit_blocks_without_moving_anything() -> None:
    q: WeightedQueue[str] = WeightedQueue({"only": 1}, 10, 1e9)
    q.push("only", "big", now=0.0)
    q.push("only", "small", now=0.0)
    assert q.pop(now=0.0, fits=lambda item: item != "big") is None
    assert len(q) == 2
    assert q.pop(now=0.0) == "big"


def test_refused_pop_keeps_the_weighted_order() -> None:
    q, twin = filled(20), filled(20)
    for _ in range(3):
        assert q.pop(now=0.0, fits=lambda _: False) is None
    assert [q.pop(now=0.0) for _ in range(10)] == [twin.pop(now=0.0) for _ in range(10)]


def test_bounds_and_unknown_classes_are_precise_errors() -> None:
    q: WeightedQueue[str] = WeightedQueue({"vip": 8, "normal": 2}, 2, 1e9)
    q.push("vip", "a", now=0.0)
    q.push("normal", "b", now=0.0)
    with pytest.raises(LimitExceeded) as caught:
        q.push("vip", "c", now=0.0)
    assert caught.value.fields["limit"] == "max_queue_length"
    with pytest.raises(InvalidTask, match="unknown queue 'gold'"):
        q.push("gold", "d", now=0.0)


def test_remove_and_depth() -> None:
    q = filled(3)
    assert q.remove(lambda t: t == "normal-1") == "normal-1"
    assert q.remove(lambda t: t == "nope") is None
    assert q.depth() == {"vip": 3, "normal": 2}


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        WeightedQueue({"vip": 0}, 10, 1.0)


def test_reweight_adds_classes_and_retires_old_ones_once_served() -> None:
    q: WeightedQueue[str] = WeightedQueue({"vip": 8, "normal": 2}, 100, 1e9)
    q.push("normal", "old", now=0.0)
    q.reweight({"gold": 5, "vip": 1})
    with pytest.raises(InvalidTask, match="unknown queue 'normal'"):
        q.push("normal", "new", now=0.0)
    q.push("gold", "g", now=0.0)
    assert sorted(t for t in (q.pop(now=0.0), q.pop(now=0.0)) if t) == ["g", "old"]
    assert q.pop(now=0.0) is None
    assert q.depth() == {"vip": 0, "gold": 0}
