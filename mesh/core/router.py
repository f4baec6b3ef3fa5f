"""Where a task should go: consistent hashing with bounded loads, then overflow. Pure.

The router holds a view (members, their loads and loaded models) and answers
``route(request)`` with a ``Decision``: targets to try in order, each with the reason it
was chosen. It never does I/O, never reads a clock, and draws its "random" choices from
the task id, so the same view and request give the same decision on any machine — which
is what lets the decision log be replayed offline and lets hypothesis check the rules.

1. **Eligible** agents: the pipeline, the model (servable; empty list = any), enough GPUs
   with enough memory, not draining.
2. **Ring**: the eligible agents on a weighted hash ring (``mesh.core.ring``, virtual nodes in
   proportion to GPU weight) keyed by model + pipeline (+ affinity key), so a model keeps
   landing on the same few agents, where it is already loaded.
3. **Bounded loads**: an agent's load is its running + queued tasks per unit of GPU weight
   (an H100 counts 1, an A40 0.35), and the bound is ``load_factor`` x the eligible
   agents' weighted average load with this task. An agent may take the task if its load
   after it stays within the bound, or if it still has a free slot within ``load_floor``
   tasks per slot: the floor lets a hot model fill its home in an idle mesh rather than
   scatter (and pay a model load) at the first task. Walking clockwise, among the first
   ``affinity_window`` agents that may take it, those with the model loaded come first.
4. **Two choices**: when no agent is under the bound, the less loaded of two agents drawn
   from the eligible ones, if under its hard limit (slots + queue length).
5. **Overflow** to other DCs, in an order drawn by their topology weights (weighted
   rendezvous hashing on the task id, so spill shares follow the weights), unless this DC
   has used its spill share or a DC is known to be full; then the **backlog**.

A target carries the most tasks its agent may hold after taking the task; the receiver
checks that against its own live count, so a stale view costs a refused offer and the next
target, never an overloaded agent.

The view changes in place: a join, a leave or a change of one agent costs that agent's
ring points and one check per class of request seen (``update_members``), never a
rebuild, whatever the size of the DC. One ring holds every member; a class walks it
skipping the agents it may not use, which meets them in the order a ring of its own
would. A class of less than a quarter of the members keeps a ring of its own, so that
walk never wades through the rest.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mesh.core.ring import HashRing, key_point
from mesh.core.routing import (
    AGENT,
    DC,
    HARD_LIMIT,
    NO_SPILL,
    NOBODY,
    NONE_ELIGIBLE,
    TO_BACKLOG,
    Candidate,
    Decision,
    Member,
    Policy,
    Request,
    Spill,
    Target,
    eligible,
)

EXPLAIN_LIMIT = 64  # candidates an explained decision lists
SMALL_CLASS = 4  # a class of under 1/SMALL_CLASS of the members walks a ring of its own
Needs = tuple[str, str, int, int]


@dataclass(slots=True)
class _Class:
    """Agents eligible for one kind of request, with their running totals; kept current
    agent by agent as members come, change and go."""

    needs: Needs
    ring: HashRing | None  # a small class's own ring; None: the router's, filtered
    eligible: set[str] = field(default_factory=set)
    order: list[str] = field(default_factory=list)  # sorted: what two-choices draws from
    shape: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    micro_weight: int = 0  # GPU weight in millionths: a sum that no order of joins changes
    tasks: int = 0

    @property
    def weight(self) -> float:
        return self.micro_weight / 1e6

    def add(self, member: Member, floor: float, tasks: int) -> None:
        agent_id = member.agent_id
        self.eligible.add(agent_id)
        bisect.insort(self.order, agent_id)
        self.shape[agent_id] = (
            member.weight,
            floor * member.slots,
            member.slots + member.queue_limit,
        )
        self.micro_weight += _micro(member.weight)
        self.tasks += tasks
        if self.ring is not None:
            self.ring.add(agent_id, member.weight)

    def remove(self, member: Member, tasks: int) -> None:
        agent_id = member.agent_id
        self.eligible.discard(agent_id)
        del self.order[bisect.bisect_left(self.order, agent_id)]
        del self.shape[agent_id]
        self.micro_weight -= _micro(member.weight)
        self.tasks -= tasks
        if self.ring is not None:
            self.ring.remove(agent_id)


def _micro(weight: float) -> int:
    return round(weight * 1_000_000)


@dataclass(slots=True)
class Totals:
    """The active (not draining) members' sums, kept as agents and loads change."""

    agents: int = 0
    slots: int = 0
    tasks: int = 0
    capacity: int = 0  # slots + queue room: the most tasks they may hold
    free_slots: int = 0  # slots with no task running
    room_left: int = 0  # tasks they could still take

    def count(self, member: Member, running: int, tasks: int, sign: int) -> None:
        if member.draining:
            return
        hard = member.slots + member.queue_limit
        self.agents += sign
        self.slots += sign * member.slots
        self.tasks += sign * tasks
        self.capacity += sign * hard
        self.free_slots += sign * max(0, member.slots - running)
        self.room_left += sign * max(0, hard - tasks)


@dataclass(slots=True)
class _Load:
    running: int = 0
    queued: int = 0

    @property
    def tasks(self) -> int:
        return self.running + self.queued


def _unit(seed: str) -> float:
    """A number in (0, 1) drawn from ``seed``."""
    return (key_point(seed) + 1) / (2**64 + 1)


@dataclass
class Router:
    policy: Policy = field(default_factory=Policy)
    _members: dict[str, Member] = field(default_factory=dict)
    _loads: dict[str, _Load] = field(default_factory=dict)
    _loaded: dict[str, frozenset[str]] = field(default_factory=dict)
    _classes: dict[Needs, _Class] = field(default_factory=dict)
    _ring: HashRing = field(default_factory=HashRing)  # every member
    _suspects: set[str] = field(default_factory=set)
    _totals: Totals = field(default_factory=lambda: Totals())  # kept as agents and loads change
    _models: Counter[str] = field(default_factory=Counter)  # agents that have each loaded
    _homes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the placement plan
    bulk_at: int = 64  # more changes than this (and a quarter of the DC) at once: rebuild

    # -- the view ------------------------------------------------------------------------

    def set_members(self, members: Iterable[Member]) -> None:
        """Replace the membership; loads and models of agents that stay are kept. Only
        the agents that differ cost anything (``update_members``)."""
        new = {m.agent_id: m for m in members}
        changes: dict[str, Member | None] = {
            a: m for a, m in new.items() if self._members.get(a) != m
        }
        changes.update(dict.fromkeys(self._members.keys() - new.keys()))
        self.update_members(changes)

    def update_members(self, changes: Mapping[str, Member | None]) -> None:
        """Apply joins and changes (the agent's new ``Member``) and leaves (``None``), in
        work proportional to them: the agents' own ring points, one eligibility check
        per class. A change of much of the DC at once (the first listing) builds the
        view afresh instead: one sort, not thousands of insertions."""
        if len(changes) > self.bulk_at + len(self._members) // 4:
            self._rebuild(changes)
            return
        for agent_id, member in changes.items():
            old = self._members.get(agent_id)
            if old == member:
                continue
            if old is not None:
                self._leave(old, staying=member is not None)
            if member is not None:
                self._join(member)

    def _rebuild(self, changes: Mapping[str, Member | None]) -> None:
        members = dict(self._members)
        for agent_id, member in changes.items():
            if member is None:
                members.pop(agent_id, None)
            else:
                members[agent_id] = member
        self._members = members
        self._loads = {a: self._loads.get(a, _Load()) for a in members}
        self._loaded = {a: self._loaded.get(a, frozenset()) for a in members}
        self._suspects &= members.keys()
        self._ring = HashRing({a: m.weight for a, m in members.items()})
        self._classes.clear()
        self._totals = Totals()
        for agent_id in members:
            self._count(agent_id, +1)
        self._models = Counter(m for models in self._loaded.values() for m in models)

    def _join(self, member: Member) -> None:
        agent_id = member.agent_id
        self._members[agent_id] = member
        load = self._loads.setdefault(agent_id, _Load())
        self._loaded.setdefault(agent_id, frozenset())
        self._count(agent_id, +1)
        self._ring.add(agent_id, member.weight)
        for needs, cls in self._classes.items():
            if eligible(member, needs):
                cls.add(member, self.policy.load_floor, load.tasks)

    def _leave(self, member: Member, staying: bool) -> None:
        agent_id = member.agent_id
        tasks = self._loads[agent_id].tasks
        self._count(agent_id, -1)
        for cls in self._classes.values():
            if agent_id in cls.eligible:
                cls.remove(member, tasks)
        if staying:
            return  # its load, models and place on the ring stay for its new self
        self._ring.remove(agent_id)
        self._models.subtract(self._loaded[agent_id])
        del self._members[agent_id], self._loads[agent_id], self._loaded[agent_id]
        self._suspects.discard(agent_id)

    def set_policy(self, policy: Policy) -> None:
        if policy != self.policy:
            self.policy = policy
            self._classes.clear()  # the floor is part of each class's shape

    def set_load(self, agent_id: str, running: int, queued: int) -> None:
        load = self._loads.get(agent_id)
        if load is None:
            return
        delta = running + queued - load.tasks
        self._count(agent_id, -1)
        load.running, load.queued = running, queued
        self._count(agent_id, +1)
        if delta:
            for cls in self._classes.values():
                if agent_id in cls.eligible:
                    cls.tasks += delta

    def set_loaded(self, agent_id: str, models: Iterable[str]) -> None:
        old = self._loaded.get(agent_id)
        if old is None:
            return
        new = frozenset(models)
        if new != old:
            self._models.subtract(old)
            self._models.update(new)
            self._loaded[agent_id] = new

    def set_homes(self, homes: dict[str, tuple[str, ...]]) -> None:
        """The placement plan (``mesh.core.planner``): a model's tasks go to its planned
        homes, the least loaded with room first, before the ring is walked."""
        self._homes = dict(homes)

    def set_suspect(self, agent_id: str, suspect: bool) -> None:
        """A suspect (it just refused or failed an offer, or went quiet) is offered tasks
        only after every other agent that may take them."""
        if suspect and agent_id in self._members:
            self._suspects.add(agent_id)
        else:
            self._suspects.discard(agent_id)

    def is_suspect(self, agent_id: str) -> bool:
        return agent_id in self._suspects

    def load(self, agent_id: str) -> tuple[int, int]:
        """Running and queued tasks of ``agent_id`` as the view has them (0, 0 if unknown)."""
        load = self._loads.get(agent_id, _Load())
        return load.running, load.queued

    def tasks_of(self, agent_id: str) -> int:
        return self._loads[agent_id].tasks

    def loaded_on(self, agent_id: str) -> frozenset[str]:
        return self._loaded[agent_id]

    def free_slots(self) -> int:
        """GPU slots of active members with no task on them, as the view has it."""
        return self._totals.free_slots

    def room_left(self) -> int:
        """Tasks active members could still take up to their hard limits (slots and
        queue room), as the view has it."""
        return self._totals.room_left

    def totals(self) -> Totals:
        return replace(self._totals)

    def models_loaded(self) -> list[str]:
        """Models some member has loaded, sorted."""
        return sorted(m for m, agents in self._models.items() if agents > 0)

    def sample(self, point: int, count: int) -> list[str]:
        """Up to ``count`` members met walking the ring from ``point``: a deterministic,
        evenly spread sample of the DC, in O(count)."""
        return list(itertools.islice(self._ring.walk(point), count))

    def _count(self, agent_id: str, sign: int) -> None:
        """Add (``sign`` 1) or take out (-1) an agent's share of the totals."""
        load = self._loads[agent_id]
        self._totals.count(self._members[agent_id], load.running, load.tasks, sign)

    @property
    def members(self) -> dict[str, Member]:
        return self._members

    @property
    def homes(self) -> Mapping[str, tuple[str, ...]]:
        """Each model's planned homes, as ``set_homes`` last gave them."""
        return self._homes

    def _class(self, needs: Needs) -> _Class:
        """The class of ``needs``, made at its first request (one pass over the members;
        from then on it changes with them)."""
        cls = self._classes.get(needs)
        if cls is None:
            chosen = [m for m in self._members.values() if eligible(m, needs)]
            small = len(chosen) * SMALL_CLASS < len(self._members)
            cls = _Class(needs, HashRing() if small else None)
            for member in chosen:
                cls.add(member, self.policy.load_floor, self._loads[member.agent_id].tasks)
            self._classes[needs] = cls
        return cls

    def _walk(self, cls: _Class, point: int) -> Iterator[str]:
        if cls.ring is not None:
            return cls.ring.walk(point)
        if len(cls.eligible) == len(self._members):
            return self._ring.walk(point)
        return self._ring.walk(point, cls.eligible)

    # -- the decision --------------------------------------------------------------------

    def bound(self, request: Request) -> float:
        """The most tasks per unit of GPU weight an agent should hold after this task."""
        return self._bound(self._class(request.needs))

    def _bound(self, cls: _Class) -> float:
        if not cls.weight:
            return 0.0
        return self.policy.load_factor * (cls.tasks + 1) / cls.weight

    def capacity(self, agent_id: str, bound: float) -> float:
        """The most tasks ``agent_id`` may hold under ``bound``, or by the floor; never
        more than its hard limit (slots + queue length)."""
        member = self._members[agent_id]
        most = max(bound * member.weight, self.policy.load_floor * member.slots)
        return min(most, member.slots + member.queue_limit)

    def route(
        self,
        request: Request,
        visited: Iterable[str] = (),
        spill: Spill = NO_SPILL,
        explain: bool = False,
    ) -> Decision:
        visited = frozenset(visited) if visited else NOBODY
        cls = self._class(request.needs)
        bound = self._bound(cls)
        window, loads, shape = self.policy.affinity_window, self._loads, cls.shape
        model, loaded = request.model, self._loaded
        # A model with no home yet (before the first plan, or between one home dropping it
        # and the next announcing it): an agent that holds it may queue it as a home would.
        slack = 0.0 if model in self._homes else self.policy.home_slack
        fits: list[tuple[str, float]] = []
        candidates: list[Candidate] = []
        for agent_id in self._walk(cls, key_point(request.key)):
            weight, floor, hard = shape[agent_id]
            most = bound * weight if bound * weight > floor else floor
            if slack and model in loaded[agent_id]:
                most += slack * weight
            if most > hard:
                most = hard
            if loads[agent_id].tasks + 1 <= most and agent_id not in visited:
                fits.append((agent_id, most))
            if explain:
                if len(candidates) < EXPLAIN_LIMIT:
                    candidates.append(self._explain(request, agent_id, most, visited))
            elif len(fits) >= window:
                break
        warm = [f for f in fits[:window] if model in loaded[f[0]]]
        ordered = warm + [f for f in fits if f not in warm] if warm else fits
        homes: frozenset[str] = frozenset()
        if model in self._homes and (planned := self._planned(model, cls, bound, visited)):
            # Homes that hold the model, then agents that hold it anyway, then homes
            # still to load it (a load is paid where the plan wants the model), then the
            # rest: the plan never sends a task to a load that an agent at hand spares.
            homes = frozenset(h[0] for h in planned)
            ready = [h for h in planned if model in loaded[h[0]]]
            ordered = (
                ready
                + [f for f in warm if f[0] not in homes]
                + [h for h in planned if h not in ready]
                + [f for f in ordered if f[0] not in homes and f not in warm]
            )
        if self._suspects:
            suspects = self._suspects
            ordered = [f for f in ordered if f[0] not in suspects] + [
                f for f in ordered if f[0] in suspects
            ]
        targets = [
            Target(
                AGENT,
                agent_id,
                most,
                (HOME_REASONS if agent_id in homes else RING_REASONS)[
                    i > 0, model in loaded[agent_id]
                ],
            )
            for i, (agent_id, most) in enumerate(ordered[: self.policy.ring_tries])
        ]
        if explain:
            picked = {t.name: ("picked" if i == 0 else "fallback") for i, t in enumerate(targets)}
            candidates = [c._replace(verdict=picked.get(c.agent_id, c.verdict)) for c in candidates]
            candidates += [
                Candidate(a, self._loads[a].tasks, 0.0, False, False, "not eligible")
                for a in sorted(self._members.keys() - cls.eligible)[:EXPLAIN_LIMIT]
            ]
        if not targets:
            two = self._two_choices(request, cls, visited)
            if two is not None:
                targets.append(two)
        if spill.to:
            targets += self._overflow(request, spill)
        targets.append(TO_BACKLOG if cls.eligible else NONE_ELIGIBLE)
        return Decision(tuple(targets), bound, tuple(candidates))

    def _planned(
        self, model: str, cls: _Class, bound: float, visited: frozenset[str]
    ) -> list[tuple[str, float]]:
        """The model's planned homes that can take a task now, least loaded first."""
        found = []
        for agent_id in self._homes[model]:
            if agent_id not in cls.shape or agent_id in visited:
                continue
            weight, floor, hard = cls.shape[agent_id]
            most = min(hard, max(bound * weight, floor) + self.policy.home_slack * weight)
            if self._loads[agent_id].tasks + 1 <= most:
                found.append((self._loads[agent_id].tasks / weight, agent_id, most))
        return [(agent_id, most) for _, agent_id, most in sorted(found)]

    def _explain(
        self, request: Request, agent_id: str, most: float, visited: frozenset[str]
    ) -> Candidate:
        tasks = self._loads[agent_id].tasks
        if agent_id in visited:
            verdict = "already visited"
        elif tasks + 1 <= most:
            verdict = "may take it (not needed)"
        else:
            verdict = f"over the bound ({tasks + 1} > {most:.2f} tasks)"
        loaded = request.model in self._loaded[agent_id]
        return Candidate(agent_id, tasks, round(most, 3), True, loaded, verdict)

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
            key=lambda a: (loads[a].tasks / members[a].weight, a),
        )
        if loads[best].tasks >= members[best].slots + members[best].queue_limit:
            return None
        return Target(
            AGENT, best, HARD_LIMIT, f"two choices: {pool[first]} or {pool[second]}, less loaded"
        )

    def _overflow(self, request: Request, spill: Spill) -> list[Target]:
        if not spill.allowed:
            return []
        open_dcs = [o for o in spill.to if o.dc not in spill.full and o.weight > 0]
        # Weighted rendezvous: the DC with the highest -w/ln(u) wins, so each DC is first
        # for a share of tasks proportional to its weight, and the order is stable per task.
        ranked = sorted(
            open_dcs,
            key=lambda o: -o.weight / math.log(_unit(f"{request.task_id}@{o.dc}")),
            reverse=True,
        )
        return [
            Target(DC, o.dc, HARD_LIMIT, f"overflow to {o.dc} (weight {o.weight:g})")
            for o in ranked
        ]


RING_REASONS = {
    (later, loaded): f"ring: {'next' if later else 'first'} agent under the bound, "
    f"model {'loaded' if loaded else 'not loaded'}"
    for later in (False, True)
    for loaded in (False, True)
}
HOME_REASONS = {
    (later, loaded): f"plan: {'next' if later else 'first'} home of the model with room, "
    f"model {'loaded' if loaded else 'not loaded'}"
    for later in (False, True)
    for loaded in (False, True)
}


# -- snapshots: what the decision log stores, so a decision can be replayed offline ------


def snapshot(router: Router) -> dict[str, object]:
    """The router's whole view as plain JSON-able data."""
    return {
        "policy": asdict(router.policy),
        "members": [
            {**asdict(m), "pipelines": sorted(m.pipelines), "models": sorted(m.models)}
            for m in router.members.values()
        ],
        "loads": {a: list(router.load(a)) for a in router.members},
        "loaded": {a: sorted(router.loaded_on(a)) for a in router.members if router.loaded_on(a)},
        "suspects": sorted(a for a in router.members if router.is_suspect(a)),
        "homes": {model: list(agents) for model, agents in sorted(router.homes.items())},
    }


def from_snapshot(data: dict[str, Any]) -> Router:
    router = Router(Policy(**data["policy"]))
    router.set_members(
        Member(
            **{
                **m,
                "gpu_memory_mb": tuple(m["gpu_memory_mb"]),
                "pipelines": frozenset(m["pipelines"]),
                "models": frozenset(m["models"]),
            }
        )
        for m in data["members"]
    )
    for agent_id, (running, queued) in data["loads"].items():
        router.set_load(agent_id, running, queued)
    for agent_id, models in data["loaded"].items():
        router.set_loaded(agent_id, models)
    for agent_id in data.get("suspects", ()):
        router.set_suspect(agent_id, True)
    router.set_homes({model: tuple(agents) for model, agents in data.get("homes", {}).items()})
    return router
