"""The local queue under the weighted policy, driven by an explicit clock: weights,
interleaving, aging, bounds. Items are ``class-name`` strings."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mesh.core.priority import Traits, Weighted
from mesh.core.queue import LaneQueue
from mesh.errors import InvalidTask, LimitExceeded


def weighted(weights: dict[str, int], max_len: int, aging_s: float) -> LaneQueue[str]:
    return LaneQueue(
        Weighted(weights, aging_s), lambda item: Traits(item.split("-")[0]), weights, max_len
    )


def filled(per_class: int, aging_s: float = 1e9) -> LaneQueue[str]:
    q = weighted({"vip": 8, "normal": 2}, 10_000, aging_s)
    for i in range(per_class):
        q.push(f"vip-{i}", now=0.0)
        q.push(f"normal-{i}", now=0.0)
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
    q = weighted({"normal": 1}, 10, aging_s=1e9)
    q.push("normal-young", now=5.0)
    q.push("normal-rerun", now=9.0, first=True)
    assert [q.pop(now=10.0), q.pop(now=10.0)] == ["normal-rerun", "normal-young"]


def test_a_lone_class_takes_every_pop() -> None:
    q = weighted({"vip": 8, "normal": 2}, 100, 1e9)
    for i in range(5):
        q.push(f"normal-{i}", now=0.0)
    assert [q.pop(now=0.0) for _ in range(5)] == [f"normal-{i}" for i in range(5)]


def test_aging_bounds_the_wait_of_a_light_class() -> None:
    q = weighted({"vip": 1000, "normal": 1}, 10_000, aging_s=30.0)
    q.push("normal-old", now=0.0)
    for i in range(100):
        q.push(f"vip-{i}", now=10.0)
    assert q.pop(now=29.0) == "vip-0"  # before the bound, weight rules
    assert q.pop(now=30.0) == "normal-old"  # at the bound, the oldest head goes first


def test_a_head_that_does_not_fit_blocks_without_moving_anything() -> None:
    q = weighted({"only": 1}, 10, 1e9)
    q.push("only-big", now=0.0)
    q.push("only-small", now=0.0)
    assert q.pop(now=0.0, fits=lambda item: item != "only-big") is None
    assert len(q) == 2
    assert q.pop(now=0.0) == "only-big"


def test_refused_pop_keeps_the_weighted_order() -> None:
    q, twin = filled(20), filled(20)
    for _ in range(3):
        assert q.pop(now=0.0, fits=lambda _: False) is None
    assert [q.pop(now=0.0) for _ in range(10)] == [twin.pop(now=0.0) for _ in range(10)]


def test_bounds_and_unknown_classes_are_precise_errors() -> None:
    q = weighted({"vip": 8, "normal": 2}, 2, 1e9)
    q.push("vip-a", now=0.0)
    q.push("normal-b", now=0.0)
    with pytest.raises(LimitExceeded) as caught:
        q.push("vip-c", now=0.0)
    assert caught.value.fields["limit"] == "max_queue_length"
    with pytest.raises(InvalidTask, match="unknown queue 'gold'"):
        q.push("gold-d", now=0.0)


def test_a_moved_item_takes_the_place_its_wait_gives_it() -> None:
    """Queued at 2 elsewhere, moved here at 9: behind what came before 2, ahead of what
    came after, and its lane as old as its head says when it leads it (aging, order)."""
    q = weighted({"normal": 1, "vip": 1}, 10, aging_s=1e9)
    q.push("normal-early", now=1.0)
    q.push("normal-late", now=5.0)
    q.push("normal-moved", now=9.0, since=2.0)
    assert q.order(now=10.0) == ["normal-early", "normal-moved", "normal-late"]
    taken = q.remove(lambda t: t == "normal-moved")
    assert taken == ("normal-moved", 2.0)  # the wait it carries on, should it move again
    q.push("normal-moved", now=12.0, since=taken[1])  # refused there: back in its place
    assert q.order(now=12.0) == ["normal-early", "normal-moved", "normal-late"]


def test_remove_and_depth() -> None:
    q = filled(3)
    assert q.remove(lambda t: t == "normal-1") == ("normal-1", 0.0)
    assert q.remove(lambda t: t == "nope") is None
    assert q.depth() == {"vip": 3, "normal": 2}


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Weighted({"vip": 0}, 1.0)


def test_new_classes_come_and_old_ones_retire_once_served() -> None:
    q = weighted({"vip": 8, "normal": 2}, 100, 1e9)
    q.push("normal-old", now=0.0)
    q.policy = Weighted({"gold": 5, "vip": 1}, 1e9)
    q.accept(["gold", "vip"])
    with pytest.raises(InvalidTask, match="unknown queue 'normal'"):
        q.push("normal-new", now=0.0)
    q.push("gold-g", now=0.0)
    assert sorted(t for t in (q.pop(now=0.0), q.pop(now=0.0)) if t) == ["gold-g", "normal-old"]
    assert q.pop(now=0.0) is None
    assert q.depth() == {"vip": 0, "gold": 0}


# -- properties ---------------------------------------------------------------------------

CLASSES = ["a", "b", "c", "d", "e"]
weights = st.dictionaries(st.sampled_from(CLASSES), st.integers(1, 20), min_size=1, max_size=5)


@given(weights, st.integers(20, 60))
def test_under_saturation_each_class_gets_its_weight_share(w: dict[str, int], cycles: int) -> None:
    """Every class always has work and nothing ages: over many pops each class's share
    is its weight's share, within 5%."""
    policy = Weighted(w, aging_s=1e9)
    heads = {Traits(name): 0.0 for name in w}
    pops = cycles * sum(w.values())
    served = Counter(
        lane.queue_class for lane in (policy.choose(heads, 1.0) for _ in range(pops)) if lane
    )
    total = sum(w.values())
    for name, weight in w.items():
        assert abs(served[name] / pops - weight / total) <= 0.05


# Bursts: (tick, class index, how many), so that several classes hold aged heads at once.
arrivals = st.lists(
    st.tuples(st.integers(0, 20), st.integers(0, 4), st.integers(1, 8)), max_size=20
)


@given(weights, arrivals, st.integers(1, 15))
@example({"a": 1, "b": 100}, [(0, 0, 10), (1, 1, 10)], 2)
def test_once_aged_a_task_is_overtaken_only_by_older_ones(
    w: dict[str, int], arriving: list[tuple[int, int, int]], aging_s: int
) -> None:
    """Starvation-freedom: one pop per tick, arrivals at any tick. Once a task has waited
    ``aging_s``, every task served before it is older than it, so its wait is bounded by
    the aging time plus the work that was queued before it."""
    q: LaneQueue[tuple[int, int, str]] = LaneQueue(
        Weighted(w, aging_s), lambda item: Traits(item[2]), w, 10_000
    )
    names = sorted(w)
    schedule = sorted((at, names[i % len(names)]) for at, i, n in arriving for _ in range(n))
    queued: set[tuple[int, int, str]] = set()  # (enqueued at, serial, class)
    serial = 0
    tick = 0
    while schedule or queued:
        while schedule and schedule[0][0] <= tick:
            at, name = schedule.pop(0)
            q.push((at, serial, name), now=float(at))
            queued.add((at, serial, name))
            serial += 1
        served = q.pop(now=float(tick))
        if served is not None:
            queued.discard(served)
            aged = [item for item in queued if tick - item[0] >= aging_s]
            assert all(served[0] <= item[0] for item in aged), (served, aged)
        tick += 1
        assert tick < 10_000


def test_an_admitted_item_coming_back_is_never_refused() -> None:
    """A job that waited aside for its quota comes back to a queue that filled meanwhile
    (or whose class was retired): it was admitted once, and is not refused now."""
    q = weighted({"vip": 8, "normal": 2}, 1, 1e9)
    q.push("vip-a", now=0.0)
    with pytest.raises(LimitExceeded):
        q.push("vip-back", now=1.0)
    q.push("vip-back", now=1.0, first=True, admitted=True)
    q.push("gold-back", now=1.0, admitted=True)
    assert [q.pop(now=2.0) for _ in range(3)].count(None) == 0


@given(weights, arrivals, st.integers(1, 15))
def test_order_is_what_the_pops_give_and_moves_nothing(
    w: dict[str, int], arriving: list[tuple[int, int, int]], aging_s: int
) -> None:
    """The order an expected start is computed from: the pops' own, policy state and all."""
    q = weighted(w, 10_000, aging_s)
    names = sorted(w)
    for n, (tick, index, count) in enumerate(arriving):
        for i in range(count):
            q.push(f"{names[index % len(names)]}-{n}.{i}", now=float(tick))
    q.pop(now=30.0)  # the policy has state (credits) by now
    ordered = q.order(now=30.0)
    assert q.order(now=30.0) == ordered  # nothing moved
    if ordered:  # stopped at an item, it is the same order up to that item
        middle = ordered[len(ordered) // 2]
        stopped = q.order(now=30.0, until=lambda item: item == middle)
        assert stopped == ordered[: ordered.index(middle) + 1]
    assert [q.pop(now=30.0) for _ in range(len(q))] == ordered
