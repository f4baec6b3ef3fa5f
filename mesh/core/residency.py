"""Which models stay in an agent's GPU memory: loading one past the memory evicts others,
least useful first. Pure.

A model in use (a run on it) is never evicted. Of the rest, a model the placement plan
does not give this agent goes first; then the one with the least recent demand, and of
equal demand the least recently used (LRU weighted by demand: a model asked for every
second outlives one touched a moment ago but never asked for since). Demand is a rate
that decays (``Demand``), so a model that went cold loses its protection within minutes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

HALF_LIFE_S = 60.0  # demand counted a minute ago weighs half


@dataclass(frozen=True, slots=True)
class Resident:
    """A loaded model as eviction sees it."""

    memory_mb: int
    last_used: float  # when a run last used it (the agent's clock)
    demand: float = 0.0  # recent arrivals per second (``Demand``)
    planned: bool = False  # the plan gives it to this agent
    in_use: int = 0  # runs on it now


def evictions(loaded: Mapping[str, Resident], need_mb: int, capacity_mb: int) -> list[str] | None:
    """The models to evict so that ``need_mb`` more fits in ``capacity_mb`` (none if it
    fits already), least useful first; None if it cannot fit even with every model not
    in use evicted (the load must wait for a run to end, or never fits)."""
    free = capacity_mb - sum(r.memory_mb for r in loaded.values())
    if need_mb <= free:
        return []
    idle = sorted(
        (name for name, r in loaded.items() if r.in_use == 0),
        key=lambda n: (loaded[n].planned, loaded[n].demand, loaded[n].last_used, n),
    )
    chosen = []
    for name in idle:
        chosen.append(name)
        free += loaded[name].memory_mb
        if need_mb <= free:
            return chosen
    return None


@dataclass(slots=True)
class Demand:
    """Arrivals per model as a rate that halves every ``half_life_s`` without arrivals."""

    half_life_s: float = HALF_LIFE_S
    _level: dict[str, tuple[float, float]] = field(default_factory=dict)  # model: (rate, at)

    def arrived(self, model: str, now: float) -> None:
        rate = self.rate(model, now)
        self._level[model] = (rate + math.log(2) / self.half_life_s, now)

    def rate(self, model: str, now: float) -> float:
        """Arrivals per second, recently: a steady stream of ``r`` a second reads ``r``."""
        level = self._level.get(model)
        if level is None:
            return 0.0
        rate, at = level
        return rate * 0.5 ** (max(0.0, now - at) / self.half_life_s)

    def rates(self, now: float, floor: float = 1e-3) -> dict[str, float]:
        """Every model's rate above ``floor``; the rest are forgotten."""
        found = {model: self.rate(model, now) for model in self._level}
        for model in [m for m, r in found.items() if r < floor]:
            del self._level[model]
            del found[model]
        return found
