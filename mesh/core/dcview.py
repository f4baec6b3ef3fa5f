"""The router's view of a DC: its members, their loads and loaded models, the placement
plan's homes, and running totals, kept current change by change. Pure.

The view changes in place: a join, a leave or a change of one agent costs that agent's
ring points and one check per class of request seen (``update_members``), never a
rebuild, whatever the size of the DC. One ring holds every member; a class walks it
skipping the agents it may not use, which meets them in the order a ring of its own
would. A class of less than a quarter of the members keeps a ring of its own, so that
walk never wades through the rest. Deciding where a task goes is ``mesh.core.router``'s.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from mesh.core.ring import HashRing
from mesh.core.routing import Member, Policy, eligible

SMALL_CLASS = 4  # a class of under 1/SMALL_CLASS of the members walks a ring of its own
Needs = tuple[str, str, int, int]


@dataclass(slots=True)
class RequestClass:
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


@dataclass
class DcView:
    policy: Policy = field(default_factory=Policy)
    _members: dict[str, Member] = field(default_factory=dict)
    loads: dict[str, _Load] = field(default_factory=dict)
    loaded: dict[str, frozenset[str]] = field(default_factory=dict)
    classes: dict[Needs, RequestClass] = field(default_factory=dict)
    _ring: HashRing = field(default_factory=HashRing)  # every member
    suspects: set[str] = field(default_factory=set)
    idle: set[str] = field(default_factory=set)  # active members with a slot no task holds
    _totals: Totals = field(default_factory=lambda: Totals())  # kept as agents and loads change
    _models: Counter[str] = field(default_factory=Counter)  # agents that have each loaded
    _homes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the placement plan
    bulk_at: int = 64  # more changes than this (and a quarter of the DC) at once: rebuild

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
        self.loads = {a: self.loads.get(a, _Load()) for a in members}
        self.loaded = {a: self.loaded.get(a, frozenset()) for a in members}
        self.suspects &= members.keys()
        self._ring = HashRing({a: m.weight for a, m in members.items()})
        self.classes.clear()
        self._totals, self.idle = Totals(), set()
        for agent_id in members:
            self._count(agent_id, +1)
        self._models = Counter(m for models in self.loaded.values() for m in models)

    def _join(self, member: Member) -> None:
        agent_id = member.agent_id
        self._members[agent_id] = member
        load = self.loads.setdefault(agent_id, _Load())
        self.loaded.setdefault(agent_id, frozenset())
        self._count(agent_id, +1)
        self._ring.add(agent_id, member.weight)
        for needs, cls in self.classes.items():
            if eligible(member, needs):
                cls.add(member, self.policy.load_floor, load.tasks)

    def _leave(self, member: Member, staying: bool) -> None:
        agent_id = member.agent_id
        tasks = self.loads[agent_id].tasks
        self._count(agent_id, -1)
        for cls in self.classes.values():
            if agent_id in cls.eligible:
                cls.remove(member, tasks)
        if staying:
            return  # its load, models and place on the ring stay for its new self
        self._ring.remove(agent_id)
        self._models.subtract(self.loaded[agent_id])
        del self._members[agent_id], self.loads[agent_id], self.loaded[agent_id]
        self.suspects.discard(agent_id)

    def set_policy(self, policy: Policy) -> None:
        if policy != self.policy:
            self.policy = policy
            self.classes.clear()  # the floor is part of each class's shape

    def set_load(self, agent_id: str, running: int, queued: int) -> None:
        load = self.loads.get(agent_id)
        if load is None:
            return
        delta = running + queued - load.tasks
        self._count(agent_id, -1)
        load.running, load.queued = running, queued
        self._count(agent_id, +1)
        if delta:
            for cls in self.classes.values():
                if agent_id in cls.eligible:
                    cls.tasks += delta

    def set_loaded(self, agent_id: str, models: Iterable[str]) -> None:
        old = self.loaded.get(agent_id)
        if old is None:
            return
        new = frozenset(models)
        if new != old:
            self._models.subtract(old)
            self._models.update(new)
            self.loaded[agent_id] = new

    def set_homes(self, homes: dict[str, tuple[str, ...]]) -> None:
        """The placement plan (``mesh.core.planner``): a model's tasks go to its planned
        homes, the least loaded with room first, before the ring is walked."""
        self._homes = dict(homes)

    def set_suspect(self, agent_id: str, suspect: bool) -> None:
        """A suspect (it just refused or failed an offer, or went quiet) is offered tasks
        only after every other agent that may take them."""
        if suspect and agent_id in self._members:
            self.suspects.add(agent_id)
        else:
            self.suspects.discard(agent_id)

    def is_suspect(self, agent_id: str) -> bool:
        return agent_id in self.suspects

    def load(self, agent_id: str) -> tuple[int, int]:
        """Running and queued tasks of ``agent_id`` as the view has them (0, 0 if unknown)."""
        load = self.loads.get(agent_id, _Load())
        return load.running, load.queued

    def tasks_of(self, agent_id: str) -> int:
        return self.loads[agent_id].tasks

    def loaded_on(self, agent_id: str) -> frozenset[str]:
        return self.loaded[agent_id]

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
        load, member = self.loads[agent_id], self._members[agent_id]
        self._totals.count(member, load.running, load.tasks, sign)
        if sign > 0 and not member.draining and load.tasks < member.slots:
            self.idle.add(agent_id)
        else:
            self.idle.discard(agent_id)

    @property
    def members(self) -> dict[str, Member]:
        return self._members

    @property
    def homes(self) -> Mapping[str, tuple[str, ...]]:
        """Each model's planned homes, as ``set_homes`` last gave them."""
        return self._homes

    def request_class(self, needs: Needs) -> RequestClass:
        """The class of ``needs``, made at its first request (one pass over the members;
        from then on it changes with them)."""
        cls = self.classes.get(needs)
        if cls is None:
            chosen = [m for m in self._members.values() if eligible(m, needs)]
            small = len(chosen) * SMALL_CLASS < len(self._members)
            cls = RequestClass(needs, HashRing() if small else None)
            for member in chosen:
                cls.add(member, self.policy.load_floor, self.loads[member.agent_id].tasks)
            self.classes[needs] = cls
        return cls

    def walk(self, cls: RequestClass, point: int) -> Iterator[str]:
        if cls.ring is not None:
            return cls.ring.walk(point)
        if len(cls.eligible) == len(self._members):
            return self._ring.walk(point)
        return self._ring.walk(point, cls.eligible)
