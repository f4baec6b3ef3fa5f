"""Model placement: which agents should hold which models, from demand. Pure.

Every agent computes the same plan from the same view (the DC's demand per model, and
each agent's GPU weight, model room and loaded models, all from gossip), and acts only on
its own part: it warms a model planned for it on an idle slot, and when it must evict,
it evicts what is not planned for it first. The router sends a model's tasks to its
planned homes (the least loaded one that has room) before walking the ring, so hot models
spread over as many agents as their demand needs and cold ones share.

The plan gives each model GPU weight in proportion to its demand (with ``headroom``),
hottest first, from agents it was planned on first, then from agents that hold it, then
from those with the most weight left: a model stays where it was planned while it needs
that much. A model's second and later homes come only out of the room left beyond one
home for every model with demand, so all of them have a home while there is room. A new
plan is made only when the agents change, demand has ``drifted`` (hysteresis: demand is
noisy, and a plan that follows every wiggle moves models, and pays loads, for nothing), or
a model with demand is ``homeless`` while an agent has room. Beyond its part, an agent
hosts what it is ``keeping``: a model moved away until a new home has it loaded, and a
model the plans left nobody's that it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

DRIFT = 0.05  # a model's share of the demand moving this much calls for a new plan


@dataclass(frozen=True, slots=True)
class Host:
    """An agent as the planner sees it."""

    name: str
    weight: float  # GPU weight: what it can run per second, in H100-seconds
    room: int  # GPU memory for models, in the unit of the plan's ``sizes`` (MB from agents)
    loaded: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Plan:
    homes: Mapping[str, tuple[str, ...]]  # model: its agents, best first
    hosting: Mapping[str, frozenset[str]] = field(default_factory=dict)  # agent: its models

    def for_agent(self, name: str) -> frozenset[str]:
        return self.hosting.get(name, frozenset())


def plan(
    demand: Mapping[str, float],
    hosts: Sequence[Host],
    previous: Plan | None = None,
    sizes: Mapping[str, int] | None = None,
    *,
    headroom: float = 1.25,
    least: float = 0.1,
) -> Plan:
    """Homes for each model with demand (work per second, in H100-seconds), each home with
    room for the model's size (``sizes``, in the unit of the hosts' room; a model not in
    it takes 1). An agent with less than ``least`` of its weight left is no extra home (a
    load for a sliver of work costs more than it gives), though any agent with room may be
    a model's only one."""
    size = _sizer(sizes)
    total = sum(v for v in demand.values() if v > 0)
    if total <= 0 or not hosts:
        return Plan({}, {})
    capacity = sum(h.weight for h in hosts)
    left = {h.name: h.weight for h in hosts}
    room = {h.name: h.room for h in hosts}
    by_name = {h.name: h for h in hosts}
    was = previous.homes if previous else {}
    wanted = sorted((m for m in demand if demand[m] > 0), key=lambda m: (-demand[m], m))
    # Room beyond one home per model: a second home is given only out of it, so every
    # model with demand has a home while there is room (a homeless model pays a load at
    # almost every task, and evicts a planned model to do it).
    spare = sum(room.values()) - sum(size(m) for m in wanted)
    holders: dict[str, set[str]] = {}
    for host in hosts:
        for model in host.loaded:
            holders.setdefault(model, set()).add(host.name)
    homes: dict[str, tuple[str, ...]] = {}
    for model in wanted:
        need = demand[model] / total * capacity * headroom
        needed = size(model)
        chosen: list[str] = []
        for name in candidates(model, by_name, left, was.get(model, ()), holders):
            if chosen and (need <= 0 or spare < needed):
                break
            if room[name] < needed or (chosen and left[name] < least * by_name[name].weight):
                continue
            if chosen:
                spare -= needed
            give = max(0.0, min(left[name], need))
            chosen.append(name)
            room[name] -= needed
            left[name] -= give
            need -= give
        if chosen:
            homes[model] = tuple(chosen)
    hosting: dict[str, set[str]] = {}
    for model, names in homes.items():
        for name in names:
            hosting.setdefault(name, set()).add(model)
    sets: dict[frozenset[str], frozenset[str]] = {}  # one object per distinct set of models
    return Plan(
        homes, {n: sets.setdefault(frozenset(ms), frozenset(ms)) for n, ms in hosting.items()}
    )


def candidates(
    model: str,
    by_name: Mapping[str, Host],
    left: Mapping[str, float],
    planned: Sequence[str],
    holders: Mapping[str, set[str]],
) -> Iterator[str]:
    """Every agent in the order a model looks for homes: those it was planned on first,
    then those that hold it, then those with the most weight left (ties by name). The
    few planned or holding come sorted in full; the rest by a sort of plain tuples, with
    no key function to call 10,000 times (the order is the same)."""
    known = {n for n in planned if n in by_name} | (holders.get(model, set()) & by_name.keys())

    def rank(name: str) -> tuple[bool, bool, float, str]:
        return (name not in planned, model not in by_name[name].loaded, -left[name], name)

    yield from sorted(known, key=rank)
    for _, name in sorted([(-left[n], n) for n in by_name if n not in known]):
        yield name


def drifted(before: Mapping[str, float], now: Mapping[str, float], drift: float = DRIFT) -> bool:
    """Whether demand moved enough since the plan was made (``before``) to make a new one:
    some model's share of the whole moved by more than ``drift`` (a model that came or
    went moved from or to nothing)."""
    total_before, total_now = sum(before.values()), sum(now.values())
    if total_before <= 0 or total_now <= 0:
        return (total_before > 0) != (total_now > 0)
    return any(
        abs(before.get(m, 0.0) / total_before - now.get(m, 0.0) / total_now) > drift
        for m in {*before, *now}
    )


def most_asked(demand: Mapping[str, float], limit: int) -> dict[str, float]:
    """The ``limit`` models with the most demand, at two significant digits: what an
    agent gossips and a DC summary carries (bounded, and unmoved by noise in the third
    digit)."""
    asked = sorted((m for m, v in demand.items() if v > 0), key=lambda m: (-demand[m], m))
    return {m: float(f"{demand[m]:.2g}") for m in asked[:limit]}


def keeping(
    me: str,
    before: frozenset[str],
    made: Plan,
    holds: Mapping[str, frozenset[str]],
    announced: Mapping[str, frozenset[str]],
) -> frozenset[str]:
    """The models ``me`` hosts beyond its part of the plan ``made``: ones it holds
    (``holds[me]``: loaded or loading) that the plan places somewhere, while no agent
    ahead of it holds and announces the model (``holds`` of the others: loaded;
    ``announced``: each one's hosting). Agents go in one order per model: the model's
    planned homes first, then by name. Of those models it keeps the ones it hosted
    ``before`` (a model the plan moved away is handed over: dropped at once, it would be
    homeless for a load's time, and each of its tasks meanwhile would pay a load
    somewhere and evict a planned model to do it) and adopts those it is the first
    holder of (agents plan from views gossip has not yet made equal: a model each gives
    to another would otherwise be nobody's). What it keeps it announces and spares from
    eviction; one order for all means two keepers never both let go."""
    mine = holds.get(me, frozenset())

    def kept(model: str) -> bool:
        def behind(agent: str) -> bool:
            return (agent not in made.homes[model], agent) > (me not in made.homes[model], me)

        holders = [a for a, models in holds.items() if model in models and a != me]
        keepers = [a for a in holders if model in announced.get(a, ())]
        if model in before:
            return all(behind(a) for a in keepers)
        return not keepers and all(behind(a) for a in holders)

    return frozenset(m for m in mine - made.for_agent(me) if m in made.homes and kept(m))


def homeless(
    made: Plan,
    demand: Mapping[str, float],
    hosts: Sequence[Host],
    sizes: Mapping[str, int] | None = None,
) -> bool:
    """Whether a model with demand has no home in ``made`` while some agent has room for
    it: a new model's demand is a sliver of the whole, too little to count as drift, but
    every one of its tasks would pay a load until a plan gives it a home."""
    size = _sizer(sizes)
    free = max((h.room - sum(size(m) for m in made.for_agent(h.name)) for h in hosts), default=0)
    return any(v > 0 and m not in made.homes and size(m) <= free for m, v in demand.items())


def _sizer(sizes: Mapping[str, int] | None) -> Callable[[str], int]:
    known = sizes or {}
    return lambda model: known.get(model, 1)
