"""Where a task should go: consistent hashing with bounded loads, then overflow. Pure.

``route(view, request)`` answers with a ``Decision``: targets to try in order, each with
the reason it was chosen. It never does I/O, never reads a clock, and draws its "random"
choices from the task id, so the same view and request give the same decision on any
machine — which is what lets the decision log be replayed offline and lets hypothesis
check the rules.

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

The view (``mesh.core.dcview``) holds the state and changes in place; ``route`` is a pure
function of a view and a request. ``Router`` is the view with the decision at hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from mesh.core.dcview import DcView, RequestClass, Totals
from mesh.core.ring import key_point
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
)

__all__ = ["Router", "Totals", "route"]

EXPLAIN_LIMIT = 64  # candidates an explained decision lists


def _unit(seed: str) -> float:
    """A number in (0, 1) drawn from ``seed``."""
    return (key_point(seed) + 1) / (2**64 + 1)


class Router(DcView):
    """A DC's view with the decision at hand: ``route`` and the bound it works to."""

    def route(
        self,
        request: Request,
        visited: Iterable[str] = (),
        spill: Spill = NO_SPILL,
        explain: bool = False,
    ) -> Decision:
        return route(self, request, visited, spill, explain)

    def bound(self, request: Request) -> float:
        return bound(self, request)

    def capacity(self, agent_id: str, bound: float) -> float:
        return capacity(self, agent_id, bound)


def bound(view: DcView, request: Request) -> float:
    """The most tasks per unit of GPU weight an agent should hold after this task."""
    return _bound(view, view.request_class(request.needs))


def _bound(view: DcView, cls: RequestClass) -> float:
    if not cls.weight:
        return 0.0
    return view.policy.load_factor * (cls.tasks + 1) / cls.weight


def capacity(view: DcView, agent_id: str, bound: float) -> float:
    """The most tasks ``agent_id`` may hold under ``bound``, or by the floor; never
    more than its hard limit (slots + queue length)."""
    member = view.members[agent_id]
    most = max(bound * member.weight, view.policy.load_floor * member.slots)
    return min(most, member.slots + member.queue_limit)


def route(
    view: DcView,
    request: Request,
    visited: Iterable[str] = (),
    spill: Spill = NO_SPILL,
    explain: bool = False,
) -> Decision:
    visited = frozenset(visited) if visited else NOBODY
    cls = view.request_class(request.needs)
    bound = _bound(view, cls)
    fits, candidates = _walk(view, request, cls, bound, visited, explain)
    ordered, homes = _order(view, request, cls, bound, visited, fits)
    model, loaded = request.model, view.loaded
    targets = [
        Target(
            AGENT,
            agent_id,
            most,
            (HOME_REASONS if agent_id in homes else RING_REASONS)[i > 0, model in loaded[agent_id]],
        )
        for i, (agent_id, most) in enumerate(ordered[: view.policy.ring_tries])
    ]
    if explain:
        picked = {t.name: ("picked" if i == 0 else "fallback") for i, t in enumerate(targets)}
        candidates = [c._replace(verdict=picked.get(c.agent_id, c.verdict)) for c in candidates]
        candidates += [
            Candidate(a, view.loads[a].tasks, 0.0, False, False, "not eligible")
            for a in sorted(view.members.keys() - cls.eligible)[:EXPLAIN_LIMIT]
        ]
    if not targets:
        two = _two_choices(view, request, cls, visited)
        if two is not None:
            targets.append(two)
    if spill.to:
        targets += _overflow(request, spill)
    targets.append(TO_BACKLOG if cls.eligible else NONE_ELIGIBLE)
    return Decision(tuple(targets), bound, tuple(candidates))


Fit = tuple[str, float]  # an agent that may take the task, and the most it may hold


def _walk(
    view: DcView,
    request: Request,
    cls: RequestClass,
    bound: float,
    visited: frozenset[str],
    explain: bool,
) -> tuple[list[Fit], list[Candidate]]:
    """The agents met walking the ring that may take the task, until the affinity window
    is full (every one met, and why, when it must ``explain``)."""
    window, loads, shape = view.policy.affinity_window, view.loads, cls.shape
    model, loaded = request.model, view.loaded
    # A model with no home yet (before the first plan, or between one home dropping it
    # and the next announcing it): an agent that holds it may queue it as a home would.
    slack = 0.0 if model in view.homes else view.policy.home_slack
    fits: list[Fit] = []
    candidates: list[Candidate] = []
    for agent_id in view.walk(cls, key_point(request.key)):
        weight, floor, hard = shape[agent_id]
        most = bound * weight if bound * weight > floor else floor
        if slack and model in loaded[agent_id]:
            most += home_slack(slack * weight, request, view.members[agent_id].slots)
        if most > hard:
            most = hard
        if loads[agent_id].tasks + 1 <= most and agent_id not in visited:
            fits.append((agent_id, most))
        if explain:
            if len(candidates) < EXPLAIN_LIMIT:
                candidates.append(_explain(view, request, agent_id, most, visited))
        elif len(fits) >= window:
            break
    return fits, candidates


def _order(
    view: DcView,
    request: Request,
    cls: RequestClass,
    bound: float,
    visited: frozenset[str],
    fits: list[Fit],
) -> tuple[list[Fit], frozenset[str]]:
    """``fits`` in the order to offer: the model warm first, the plan's homes before the
    ring, suspects last; and the homes among them."""
    loaded, window, model = view.loaded, view.policy.affinity_window, request.model
    warm = [f for f in fits[:window] if model in loaded[f[0]]]
    ordered = warm + [f for f in fits if f not in warm] if warm else fits
    homes: frozenset[str] = frozenset()
    if model in view.homes and (planned := _planned(view, request, cls, bound, visited)):
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
    if view.suspects:
        suspects = view.suspects
        ordered = [f for f in ordered if f[0] not in suspects] + [
            f for f in ordered if f[0] in suspects
        ]
    return ordered, homes


def home_slack(slack: float, request: Request, slots: int) -> float:
    """The tasks past the bound an agent holding the request's model may queue: the
    policy's ``slack``, but no more than would wait less than a load of the model
    elsewhere (each task queued delays the next by a run over the agent's slots). Long
    tasks get none: a 0.5 s load elsewhere beats a 20 s wait here."""
    if request.run_s <= 0:
        return slack  # nothing known of its runs yet: the policy's word
    return min(slack, request.load_s * slots / request.run_s)


def _planned(
    view: DcView, request: Request, cls: RequestClass, bound: float, visited: frozenset[str]
) -> list[tuple[str, float]]:
    """The model's planned homes that can take a task now, least loaded first."""
    found = []
    for agent_id in view.homes[request.model]:
        if agent_id not in cls.shape or agent_id in visited:
            continue
        weight, floor, hard = cls.shape[agent_id]
        slack = home_slack(view.policy.home_slack * weight, request, view.members[agent_id].slots)
        most = min(hard, max(bound * weight, floor) + slack)
        if view.loads[agent_id].tasks + 1 <= most:
            found.append((view.loads[agent_id].tasks / weight, agent_id, most))
    return [(agent_id, most) for _, agent_id, most in sorted(found)]


def _explain(
    view: DcView, request: Request, agent_id: str, most: float, visited: frozenset[str]
) -> Candidate:
    tasks = view.loads[agent_id].tasks
    if agent_id in visited:
        verdict = "already visited"
    elif tasks + 1 <= most:
        verdict = "may take it (not needed)"
    else:
        verdict = f"over the bound ({tasks + 1} > {most:.2f} tasks)"
    loaded = request.model in view.loaded[agent_id]
    return Candidate(agent_id, tasks, round(most, 3), True, loaded, verdict)


def _two_choices(
    view: DcView, request: Request, cls: RequestClass, visited: frozenset[str]
) -> Target | None:
    pool = [a for a in cls.order if a not in visited] if visited else cls.order
    if not pool:
        return None
    # Two distinct draws from the task id: deterministic, and no RNG object per call.
    point = key_point(request.task_id)
    first = point % len(pool)
    second = (first + 1 + (point >> 32) % max(1, len(pool) - 1)) % len(pool)
    loads, members = view.loads, view.members
    best = min(
        (pool[first], pool[second]),
        key=lambda a: (loads[a].tasks / members[a].weight, a),
    )
    if loads[best].tasks >= members[best].slots + members[best].queue_limit:
        return None
    return Target(
        AGENT, best, HARD_LIMIT, f"two choices: {pool[first]} or {pool[second]}, less loaded"
    )


def _overflow(request: Request, spill: Spill) -> list[Target]:
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
        Target(DC, o.dc, HARD_LIMIT, f"overflow to {o.dc} (weight {o.weight:g})") for o in ranked
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
