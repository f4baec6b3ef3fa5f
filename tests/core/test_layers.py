"""Splitting a model's layers over agents, pure: every split is contiguous, covers every
layer once and fits each agent's memory; dynamic programming is never worse than greedy
and is the optimum for its order of agents; nothing fits when the memory is not there."""

from __future__ import annotations

import math

from hypothesis import example, given
from hypothesis import strategies as st

from mesh.core.layers import Device, Split, Stage, balanced, greedy, optimum, rest

layer_sizes = st.lists(st.integers(100, 3000), min_size=1, max_size=16)
devices = st.lists(
    st.builds(Device, st.just(""), st.integers(500, 20_000), st.sampled_from([0.5, 0.7, 1.0])),
    min_size=1,
    max_size=4,
).map(lambda found: [Device(f"gpu-{i}", d.memory_mb, d.speed) for i, d in enumerate(found)])


def valid(split: Split, memory: list[int], fleet: list[Device]) -> bool:
    by_name = {d.name: d for d in fleet}
    layer = 0
    for stage in split.stages:
        assert stage.first == layer and stage.count > 0  # contiguous, in order, no gap
        used = sum(memory[stage.first : stage.first + stage.count])
        assert used <= by_name[stage.agent].memory_mb
        layer += stage.count
    assert len({s.agent for s in split.stages}) == len(split.stages)  # an agent once
    return layer == len(memory)


@example([501, 100], [Device("gpu-0", 500, 0.5), Device("gpu-1", 501, 0.5)])
@given(layer_sizes, devices)
def test_splits_are_valid_and_dp_is_never_worse_than_greedy(memory: list[int], fleet) -> None:
    compute = [m / 1000 for m in memory]
    quick, planned, best = (f(memory, compute, fleet) for f in (greedy, balanced, optimum))
    fits = sum(memory) <= sum(d.memory_mb for d in fleet)
    for split in (quick, planned, best):
        if split.fits:
            assert valid(split, memory, fleet)
    assert best.fits >= planned.fits >= quick.fits  # the optimum tries every order
    if not fits:
        assert not best.fits and best.bottleneck_s == math.inf
    if quick.fits:
        assert planned.bottleneck_s <= quick.bottleneck_s + 1e-9
    if best.fits:
        assert best.bottleneck_s <= planned.bottleneck_s + 1e-9


def test_a_balanced_split_evens_out_the_stages() -> None:
    memory, compute = [1000] * 8, [1.0] * 8
    fleet = [Device("fast", 8000, 1.0), Device("slow", 8000, 0.5)]
    assert greedy(memory, compute, fleet).bottleneck_s == 8.0  # the fast one takes all
    split = balanced(memory, compute, fleet)
    assert [s.agent for s in split.stages] == ["fast", "slow"]
    assert split.bottleneck_s == 6.0  # the best whole-layer split: 6 on fast, or 3 on slow


@given(layer_sizes, devices, st.integers(0, 16))
def test_the_rest_of_a_run_is_split_from_where_it_stopped(
    memory: list[int], fleet: list[Device], done: int
) -> None:
    done = min(done, len(memory) - 1)
    compute = [m / 1000 for m in memory]
    left = rest(memory, compute, fleet, done)
    assert left.fits == balanced(memory[done:], compute[done:], fleet).fits
    if left.fits:
        assert left.stages[0].first == done  # it picks up at the first layer not run
        whole = [0] * done + memory[done:]  # the layers run take no memory now
        assert valid(Split(((Stage("", 0, done),) if done else ()) + left.stages, 0.0), whole,
                     [*fleet, Device("", 0, 1.0)])  # fmt: skip
