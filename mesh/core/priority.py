"""Priority policies: which waiting task goes next, by a policy the administrator names.

Waiting tasks sit in *lanes*: tasks with the same ``Traits`` (queue class, tenant, what
they run, how many GPUs) differ only in age, so within a lane the oldest goes first and a
policy only ever compares lane heads. The same policies order every agent's local queue
and the queue owner's walk over the DC's backlog.

Every policy serves online work before batch (online is the interactive call someone
waits on; batch's own share of the GPUs is kept by preemption's rules, not by the queue),
and shares one rule against starvation: a head that has waited ``aging_s`` goes before
anything younger, oldest first. Once a task has aged, only tasks enqueued before it
can still go ahead of it, so its wait is bounded (``wait_bound``) whatever the policy
prefers.

- ``weighted``: smooth weighted round-robin between queue classes (``vip: 8, normal: 2``
  takes 8 vip and 2 normal of every 10, interleaved, as nginx balances upstreams).
- ``fair_share``: the tenant furthest below its share of GPU time goes first (stride
  scheduling: each tenant's *pass* grows by the GPU-seconds it is served over its share,
  the lowest pass goes next; a tenant that comes back starts at the busiest's level, so
  idling earns no credit).
- ``shortest_first``: the head expected to take the fewest GPU-seconds, from run times
  learned per pipeline and model from finished tasks (``Estimates``).

Pure and deterministic: time is passed in, ties break by age then by name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from mesh.core.classes import ONLINE

DEFAULT_RUN_S = 1.0  # a kind never seen finishing is expected to take this long


@dataclass(frozen=True, slots=True, order=True)
class Traits:
    """All a policy may know about a waiting task but its age."""

    queue_class: str = ""
    tenant: str = ""  # the user's group; the user when it has none
    kind: str = ""  # pipeline/model: what run times are learned per
    gpus: int = 1
    task_class: str = "batch"  # or "online" (``mesh.core.classes``)


class Estimates:
    """Expected run seconds per kind: an exponentially weighted mean of finished runs."""

    def __init__(self, alpha: float = 0.2, default_s: float = DEFAULT_RUN_S) -> None:
        self._alpha = alpha
        self._default_s = default_s
        self._mean: dict[str, float] = {}

    def learn(self, kind: str, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        old = self._mean.get(kind)
        self._mean[kind] = seconds if old is None else old + self._alpha * (seconds - old)

    def expected(self, kind: str) -> float:
        return self._mean.get(kind, self._default_s)

    def for_model(self, model: str) -> float:
        """Expected run seconds of a task on ``model``, over the pipelines seen running it."""
        seen = [mean for kind, mean in self._mean.items() if kind.endswith(f"/{model}")]
        return sum(seen) / len(seen) if seen else self._default_s

    def cost(self, traits: Traits) -> float:
        """GPU-seconds a task of these traits is expected to take."""
        return max(1, traits.gpus) * self.expected(traits.kind)


class Policy(ABC):
    """Chooses among lane heads. ``choose`` moves the policy's accounting as if the head
    were served; ``snapshot`` before and ``restore`` after undo that when the head could
    not be placed after all (no room), so a refused head costs nothing."""

    name: ClassVar[str]

    def __init__(self, aging_s: float, estimates: Estimates | None = None) -> None:
        self.aging_s = aging_s
        self.estimates = estimates or Estimates()

    def choose(self, heads: Mapping[Traits, float], now: float) -> Traits | None:
        """The lane to serve, given when each non-empty lane's head was enqueued."""
        if not heads:
            return None
        aged = [lane for lane, at in heads.items() if now - at >= self.aging_s]
        if aged:
            chosen = min(aged, key=lambda lane: (heads[lane], lane))
        else:
            online = {lane: at for lane, at in heads.items() if lane.task_class == ONLINE}
            chosen = self._best(online or heads)
        self._served(chosen, heads)
        return chosen

    @abstractmethod
    def _best(self, heads: Mapping[Traits, float]) -> Traits: ...

    def _served(self, lane: Traits, heads: Mapping[Traits, float]) -> None:  # noqa: B027
        """Account for ``lane``'s head being served (nothing, for a stateless policy)."""

    def snapshot(self) -> object:
        return None

    def restore(self, state: object) -> None:  # noqa: B027
        """Undo every ``choose`` since ``snapshot`` returned ``state``."""


def _oldest(heads: Mapping[Traits, float], lanes: list[Traits]) -> Traits:
    return min(lanes, key=lambda lane: (heads[lane], lane))


class Weighted(Policy):
    """Smooth weighted round-robin between queue classes; oldest head within a class. A
    class no longer in the weights (a retired one) is served at weight 1 until empty."""

    name = "weighted"

    def __init__(
        self, weights: Mapping[str, int], aging_s: float, estimates: Estimates | None = None
    ) -> None:
        super().__init__(aging_s, estimates)
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError("weights must be positive")
        self.weights = dict(weights)
        self._credit: dict[str, int] = {}

    def _best(self, heads: Mapping[Traits, float]) -> Traits:
        classes = sorted({lane.queue_class for lane in heads})
        weight = {c: self.weights.get(c, 1) for c in classes}
        for c, w in weight.items():
            self._credit[c] = self._credit.get(c, 0) + w
        best = max(classes, key=lambda c: self._credit[c])
        self._credit[best] -= sum(weight.values())
        return _oldest(heads, [lane for lane in heads if lane.queue_class == best])

    def snapshot(self) -> object:
        return dict(self._credit)

    def restore(self, state: object) -> None:
        assert isinstance(state, dict)
        self._credit = state


class FairShare(Policy):
    """The tenant with the lowest pass (GPU-seconds served over its share) goes first."""

    name = "fair_share"

    def __init__(
        self, shares: Mapping[str, float], aging_s: float, estimates: Estimates | None = None
    ) -> None:
        super().__init__(aging_s, estimates)
        self.shares = dict(shares)
        self._pass: dict[str, float] = {}
        self._now = 0.0  # virtual time: the pass of the tenant served last

    def share(self, tenant: str) -> float:
        return self.shares.get(tenant, 1.0)

    def _passes(self, heads: Mapping[Traits, float]) -> dict[str, float]:
        """Each waiting tenant's pass. One back from idling starts at the virtual time,
        the lowest pass of those that kept waiting, so idling earns no credit."""
        tenants = sorted({lane.tenant for lane in heads})
        return {t: max(self._pass.get(t, self._now), self._now) for t in tenants}

    def _best(self, heads: Mapping[Traits, float]) -> Traits:
        passes = self._passes(heads)
        oldest = {t: min(at for lane, at in heads.items() if lane.tenant == t) for t in passes}
        tenant = min(passes, key=lambda t: (passes[t], oldest[t], t))
        return _oldest(heads, [lane for lane in heads if lane.tenant == tenant])

    def _served(self, lane: Traits, heads: Mapping[Traits, float]) -> None:
        passes = self._passes(heads)
        self._now = max(self._now, min(passes.values()))
        cost = self.estimates.cost(lane) / self.share(lane.tenant)
        self._pass[lane.tenant] = passes[lane.tenant] + cost

    def snapshot(self) -> object:
        return dict(self._pass), self._now

    def restore(self, state: object) -> None:
        assert isinstance(state, tuple)
        passes, self._now = state
        self._pass = dict(passes)


class ShortestFirst(Policy):
    """The head expected to take the fewest GPU-seconds goes first."""

    name = "shortest_first"

    def _best(self, heads: Mapping[Traits, float]) -> Traits:
        return min(heads, key=lambda lane: (self.estimates.cost(lane), heads[lane], lane))


POLICIES = ("weighted", "fair_share", "shortest_first")


def make(
    name: str,
    weights: Mapping[str, int],
    shares: Mapping[str, float],
    aging_s: float,
    estimates: Estimates | None = None,
) -> Policy:
    """The policy called ``name``: ``weights`` per queue class, ``shares`` per tenant."""
    if name == Weighted.name:
        return Weighted(weights, aging_s, estimates)
    if name == FairShare.name:
        return FairShare(shares, aging_s, estimates)
    if name == ShortestFirst.name:
        return ShortestFirst(aging_s, estimates)
    raise ValueError(f"unknown priority policy {name!r}; one of {', '.join(POLICIES)}")


def wait_bound(aging_s: float, earlier_gpu_s: float, slots: int, longest_s: float) -> float:
    """The longest a task can wait under any policy here: it ages in ``aging_s``, then
    only work enqueued before it (``earlier_gpu_s`` GPU-seconds of it) goes first, on
    ``slots`` GPUs, after the runs that hold them now end (at most ``longest_s``)."""
    return aging_s + longest_s + earlier_gpu_s / max(1, slots)
