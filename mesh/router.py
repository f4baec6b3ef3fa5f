"""Where a task should go: consistent hashing with bounded loads, then overflow. Pure.

The router holds a view (members, their loads) and answers ``route(request)`` with a
``Decision``: targets to try in order, each with the reason it was chosen. It never does
I/O, never reads a clock, and draws its "random" choices from the task id, so the same
view and request give the same decision on any machine — which is what lets the decision
log be replayed offline and lets hypothesis check the rules below.

1. **Eligible** agents: the pipeline, the model (servable; empty list = any), enough GPUs
   with enough memory, not draining.
2. **Ring**: the eligible agents on a weighted hash ring (``mesh.ring``) keyed by model +
   pipeline (+ affinity key), so a model keeps landing where it is already loaded.
3. **Bounded loads**: an agent's load is (running + queued) per GPU slot. Walking clockwise,
   the first agents whose load *after* taking the task stays within the bound get it, where
   bound = max(load_factor x the eligible agents' average load with this task, load_floor).
   The floor lets a hot model fill its home agent's slots in an idle mesh rather than
   scatter (and pay a model load) at the first task.
4. **Two choices**: when every agent is over the bound, the less loaded of two agents drawn
   from the eligible ones, if under its hard limit (slots + queue length).
5. **Overflow** to other DCs, in an order drawn by their topology weights (weighted
   rendezvous hashing on the task id, so spill shares follow the weights), unless this DC
   has used its spill share or a DC is known to be full; then the **backlog**.

Receivers check their own live load against the bound the target carries, so a stale view
costs a refused offer and the next target, never an overloaded agent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from mesh.ring import HashRing, key_point

AGENT = "agent"
DC = "dc"
BACKLOG = "backlog"
HARD_LIMIT = 0.0  # a target's max_load meaning "up to the receiver's hard limit"
EXPLAIN_LIMIT = 64


@dataclass(frozen=True, slots=True)
class Member:
    """What routing needs to know of an agent of this DC."""

    agent_id: str
    weight: float
    gpu_memory_mb: tuple[int, ...]
    pipelines: frozenset[str]
    models: frozenset[str] = frozenset()  # servable; empty: any model
    models_loaded: frozenset[str] = frozenset()
    draining: bool = False
    queue_limit: int = 256

    @property
    def slots(self) -> int:
        return max(1, len(self.gpu_memory_mb))


@dataclass(frozen=True, slots=True)
class Request:
    """The routing-relevant part of a task."""

    task_id: str
    model: str
    pipeline: str
    affinity_key: str = ""
    gpu_count: int = 1
    min_gpu_memory_mb: int = 0

    @property
    def key(self) -> str:
        base = f"{self.model}/{self.pipeline}"
        return f"{base}/{self.affinity_key}" if self.affinity_key else base

    @property
    def needs(self) -> tuple[str, str, int, int]:
        return (self.pipeline, self.model, max(1, self.gpu_count), self.min_gpu_memory_mb)


@dataclass(frozen=True, slots=True)
class Policy:
    load_factor: float = 1.25
    load_floor: float = 1.0
    ring_tries: int = 3  # agents under the bound offered in ring order before two choices


@dataclass(frozen=True, slots=True)
class Overflow:
    dc: str
    weight: float


@dataclass(frozen=True, slots=True)
class Spill:
    """What this DC may do beyond itself for the next task."""

    to: tuple[Overflow, ...] = ()
    allowed: bool = True  # False once this DC has sent its maximum share recently
    full: frozenset[str] = frozenset()  # DCs known to have no free capacity


NO_SPILL = Spill()


class Target(NamedTuple):  # tuples, not frozen dataclasses: built on every decision
    kind: str  # AGENT, DC or BACKLOG
    name: str
    max_load: float  # per-slot load the receiver may reach; HARD_LIMIT: up to its limit
    reason: str


TO_BACKLOG = Target(BACKLOG, "", HARD_LIMIT, "backlog: no agent or DC took it")
NONE_ELIGIBLE = Target(BACKLOG, "", HARD_LIMIT, "backlog: no eligible agent in this DC")


class Candidate(NamedTuple):
    """One agent as ``explain`` shows it, in ring order."""

    agent_id: str
    load: float
    eligible: bool
    loaded: bool
    verdict: str


class Decision(NamedTuple):
    targets: tuple[Target, ...]
    bound: float
    candidates: tuple[Candidate, ...] = ()

    @property
    def first(self) -> Target:
        return self.targets[0]

    def to_dict(self) -> dict[str, object]:
        return {
            "targets": [t._asdict() for t in self.targets],
            "bound": self.bound,
            "candidates": [c._asdict() for c in self.candidates],
        }


@dataclass(slots=True)
class _Class:
    """Agents eligible for one kind of request, with their ring and running totals."""

    eligible: frozenset[str]
    order: tuple[str, ...]  # the eligible ids, sorted: what two-choices draws from
    ring: HashRing
    slots: int
    tasks: int


@dataclass(slots=True)
class _Load:
    running: int = 0
    queued: int = 0

    @property
    def tasks(self) -> int:
        return self.running + self.queued


def eligible(member: Member, needs: tuple[str, str, int, int]) -> bool:
    pipeline, model, gpu_count, min_memory = needs
    if member.draining or pipeline not in member.pipelines:
        return False
    if member.models and model not in member.models:
        return False
    return sum(1 for m in member.gpu_memory_mb if m >= min_memory) >= gpu_count


def _unit(seed: str) -> float:
    """A number in (0, 1) drawn from ``seed``."""
    return (key_point(seed) + 1) / (2**64 + 1)


@dataclass
class Router:
    policy: Policy = field(default_factory=Policy)
    _members: dict[str, Member] = field(default_factory=dict)
    _loads: dict[str, _Load] = field(default_factory=dict)
    _classes: dict[tuple[str, str, int, int], _Class] = field(default_factory=dict)

    # -- the view ------------------------------------------------------------------------

    def set_members(self, members: Iterable[Member]) -> None:
        """Replace the membership; loads of agents that stay are kept."""
        new = {m.agent_id: m for m in members}
        if new == self._members:
            return
        self._members = new
        self._loads = {a: self._loads.get(a, _Load()) for a in new}
        self._classes.clear()

    def set_load(self, agent_id: str, running: int, queued: int) -> None:
        load = self._loads.get(agent_id)
        if load is None:
            return
        delta = running + queued - load.tasks
        load.running, load.queued = running, queued
        if delta:
            for cls in self._classes.values():
                if agent_id in cls.eligible:
                    cls.tasks += delta

    def load_of(self, agent_id: str) -> float:
        member = self._members[agent_id]
        return self._loads[agent_id].tasks / member.slots

    @property
    def members(self) -> dict[str, Member]:
        return self._members

    def _class(self, needs: tuple[str, str, int, int]) -> _Class:
        cls = self._classes.get(needs)
        if cls is None:
            chosen = {a: m for a, m in self._members.items() if eligible(m, needs)}
            cls = _Class(
                eligible=frozenset(chosen),
                order=tuple(sorted(chosen)),
                ring=HashRing({a: m.weight for a, m in chosen.items()}),
                slots=sum(m.slots for m in chosen.values()),
                tasks=sum(self._loads[a].tasks for a in chosen),
            )
            self._classes[needs] = cls
        return cls

    # -- the decision --------------------------------------------------------------------

    def bound(self, request: Request) -> float:
        cls = self._class(request.needs)
        if not cls.slots:
            return self.policy.load_floor
        average = (cls.tasks + 1) / cls.slots
        return max(self.policy.load_factor * average, self.policy.load_floor)

    def route(
        self,
        request: Request,
        visited: Iterable[str] = (),
        spill: Spill = NO_SPILL,
        explain: bool = False,
    ) -> Decision:
        visited = frozenset(visited)
        cls = self._class(request.needs)
        bound = self.bound(request)
        targets: list[Target] = []
        candidates: list[Candidate] = []
        tries = self.policy.ring_tries
        for agent_id in cls.ring.walk(key_point(request.key)):
            tasks, slots = self._loads[agent_id].tasks, self._members[agent_id].slots
            fits = agent_id not in visited and (tasks + 1) / slots <= bound
            if fits and len(targets) < tries:
                nth = "first" if not targets else "next"
                targets.append(Target(AGENT, agent_id, bound, f"ring: {nth} agent under the bound"))
            if explain:
                if len(candidates) < EXPLAIN_LIMIT:
                    candidates.append(self._explain(request, agent_id, bound, visited, targets))
            elif len(targets) >= tries:
                break
        if explain:
            candidates += [
                Candidate(a, round(self.load_of(a), 4), False, False, "not eligible")
                for a in sorted(self._members.keys() - cls.eligible)[:EXPLAIN_LIMIT]
            ]
        if len(targets) < tries:
            two = self._two_choices(request, cls, visited)
            if two is not None and all(t.name != two.name for t in targets):
                targets.append(two)
        if spill.to:
            targets += self._overflow(request, spill)
        targets.append(TO_BACKLOG if cls.eligible else NONE_ELIGIBLE)
        return Decision(tuple(targets), bound, tuple(candidates))

    def _explain(
        self,
        request: Request,
        agent_id: str,
        bound: float,
        visited: frozenset[str],
        targets: list[Target],
    ) -> Candidate:
        member = self._members[agent_id]
        after = (self._loads[agent_id].tasks + 1) / member.slots
        if agent_id in visited:
            verdict = "already visited"
        elif any(t.name == agent_id for t in targets):
            verdict = "picked" if targets[0].name == agent_id else "fallback"
        elif after <= bound:
            verdict = "under the bound (not needed)"
        else:
            verdict = f"over the bound ({after:.2f} > {bound:.2f})"
        loaded = request.model in member.models_loaded
        return Candidate(agent_id, round(self.load_of(agent_id), 4), True, loaded, verdict)

    def _two_choices(self, request: Request, cls: _Class, visited: frozenset[str]) -> Target | None:
        pool = [a for a in cls.order if a not in visited] if visited else cls.order
        if not pool:
            return None
        # Two distinct draws from the task id: deterministic, and no RNG object per call.
        point = key_point(request.task_id)
        first = point % len(pool)
        second = (first + 1 + (point >> 32) % max(1, len(pool) - 1)) % len(pool)
        loads, members = self._loads, self._members
        best = min(
            (pool[first], pool[second]),
            key=lambda a: (loads[a].tasks / members[a].slots, a),
        )
        if loads[best].tasks >= members[best].slots + members[best].queue_limit:
            return None
        return Target(
            AGENT, best, HARD_LIMIT, f"two choices: {pool[first]} or {pool[second]}, less loaded"
        )

    def _overflow(self, request: Request, spill: Spill) -> list[Target]:
        if not spill.to or not spill.allowed:
            return []
        open_dcs = [o for o in spill.to if o.dc not in spill.full and o.weight > 0]
        # Weighted rendezvous: the DC with the highest -w/ln(u) wins, so each DC is first
        # for a share of tasks proportional to its weight, and the order is stable per task.
        ranked = sorted(
            open_dcs,
            key=lambda o: -o.weight / math.log(_unit(f"{request.task_id}@{o.dc}")),
            reverse=True,
        )
        return [Target(DC, o.dc, HARD_LIMIT, f"overflow to {o.dc} (weight {o.weight:g})")
                for o in ranked]  # fmt: skip
