"""Splitting one model's layers over several agents, when no single agent holds it. Pure.

A pipeline-parallel split gives each agent (a *stage*) a contiguous block of layers that
fits its free GPU memory; a request flows through the stages in order, so the split is
as fast as its slowest stage: a stage's time is its layers' compute over its speed. Two
allocators, as the design describes:

- ``greedy``: fastest agents first, each filled with as many layers as its memory holds;
  quick, and blind to the bottleneck it makes.
- ``balanced`` (dynamic programming): for agents in a given order, the split of layers into
  contiguous blocks that minimizes the slowest stage, within every agent's memory
  (``O(layers^2 * agents)``). The agents are taken fastest first.

``optimum`` tries every order of the agents (small fleets only): what ``bench layers``
compares both against. ``rest`` splits what is left of a run whose next agent failed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stage:
    agent: str
    first: int  # index of its first layer
    count: int  # layers it holds


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    memory_mb: int  # free GPU memory
    speed: float  # compute per second, relative (an H100 is 1.0)


@dataclass(frozen=True, slots=True)
class Split:
    stages: tuple[Stage, ...]
    bottleneck_s: float  # the slowest stage's time per request; inf if it does not fit

    @property
    def fits(self) -> bool:
        return math.isfinite(self.bottleneck_s)


NO_FIT = Split((), math.inf)


def _stage_time(compute: Sequence[float], first: int, count: int, speed: float) -> float:
    return sum(compute[first : first + count]) / speed


def _bottleneck(
    stages: Sequence[Stage], compute: Sequence[float], devices: dict[str, Device]
) -> float:
    return max(
        (_stage_time(compute, s.first, s.count, devices[s.agent].speed) for s in stages),
        default=math.inf,
    )


def greedy(memory_mb: Sequence[int], compute: Sequence[float], devices: Sequence[Device]) -> Split:
    """Fastest first, each agent filled as far as its memory allows."""
    by_name = {d.name: d for d in devices}
    stages, layer = [], 0
    for device in sorted(devices, key=lambda d: (-d.speed, d.name)):
        if layer == len(memory_mb):
            break
        used, count = 0, 0
        while (
            layer + count < len(memory_mb) and used + memory_mb[layer + count] <= device.memory_mb
        ):
            used += memory_mb[layer + count]
            count += 1
        if count:
            stages.append(Stage(device.name, layer, count))
            layer += count
    if layer < len(memory_mb):
        return NO_FIT
    return Split(tuple(stages), _bottleneck(stages, compute, by_name))


def balanced(
    memory_mb: Sequence[int], compute: Sequence[float], devices: Sequence[Device]
) -> Split:
    """The split that minimizes the slowest stage, for agents fastest first; if that
    order fits no split, for the largest first (a small fast GPU first may hold no layer
    a larger one after it could not take over: layers of 501 and 100 MB on GPUs of 500
    and 501 MB of one speed). Other orders are not tried: ``optimum`` checks on small
    fleets what one order may miss."""
    fastest = sorted(devices, key=lambda d: (-d.speed, d.name))
    split = _best_for_order(memory_mb, compute, fastest)
    if split.fits:
        return split
    return _best_for_order(
        memory_mb, compute, sorted(devices, key=lambda d: (-d.memory_mb, d.name))
    )


def rest(
    memory_mb: Sequence[int], compute: Sequence[float], devices: Sequence[Device], done: int
) -> Split:
    """The balanced split of the layers from ``done`` on, for a run whose first ``done``
    layers have run (and whose next agent failed): the stages number layers as the whole
    model does."""
    split = balanced(memory_mb[done:], compute[done:], devices)
    if not split.fits:
        return split
    shifted = tuple(Stage(s.agent, s.first + done, s.count) for s in split.stages)
    return Split(shifted, split.bottleneck_s)


def _best_for_order(
    memory_mb: Sequence[int], compute: Sequence[float], order: Sequence[Device]
) -> Split:
    layers, agents = len(memory_mb), len(order)
    prefix_memory = list(itertools.accumulate(memory_mb, initial=0))
    prefix_compute = list(itertools.accumulate(compute, initial=0.0))
    # best[j][i]: the least bottleneck placing the first i layers on the first j agents
    best = [[math.inf] * (layers + 1) for _ in range(agents + 1)]
    cut = [[0] * (layers + 1) for _ in range(agents + 1)]
    best[0][0] = 0.0
    for j in range(1, agents + 1):
        device = order[j - 1]
        for i in range(layers + 1):
            for k in range(i, -1, -1):  # agent j holds layers k..i-1 (none when k == i)
                if prefix_memory[i] - prefix_memory[k] > device.memory_mb:
                    break
                if best[j - 1][k] == math.inf:
                    continue
                stage = (prefix_compute[i] - prefix_compute[k]) / device.speed
                value = max(best[j - 1][k], stage)
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, k
    if best[agents][layers] == math.inf:
        return NO_FIT
    stages, i = [], layers
    for j in range(agents, 0, -1):
        k = cut[j][i]
        if i > k:
            stages.append(Stage(order[j - 1].name, k, i - k))
        i = k
    return Split(tuple(reversed(stages)), best[agents][layers])


def optimum(memory_mb: Sequence[int], compute: Sequence[float], devices: Sequence[Device]) -> Split:
    """The best split over every order of the agents: for checking, on small fleets."""
    found = NO_FIT
    for order in itertools.permutations(devices):
        split = _best_for_order(memory_mb, compute, order)
        if split.bottleneck_s < found.bottleneck_s:
            found = split
    return found
