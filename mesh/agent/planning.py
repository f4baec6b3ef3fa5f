"""This agent's part in model placement: publish its demand, compute the DC's plan, warm
what the plan gives it.

Every ``plan_interval_s`` the agent gossips the work asked of it per model (a decaying
rate of arrivals times its learned run time) and the models its GPU memory holds. From
every agent's gossip it computes the plan (``mesh.core.planner``, a pure function), with
the homes the agents announced as the previous plan, so all compute alike; it is made
again only when the agents change, demand drifts, or a model with demand has no home
while an agent has room for it. The agent takes on its own part only and announces it
in gossip (``hosting``): every router routes by the announced homes, so routers agree
with what agents keep even while their computed plans differ. A model the plan moves away
it hands over (it keeps and announces it until a new home has it loaded), and a model it
holds that no one announces it adopts (``planner.keeping``). It keeps what it announces
from eviction and warms one of its models that is not loaded, only while a
slot is idle and nothing waits (warming never delays a task, never evicts a planned model).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, runtime_checkable

from mesh.agent.decisionlog import DecisionLog
from mesh.agent.duties import observed
from mesh.agent.executor import Executor
from mesh.agent.lag import collections_paused
from mesh.agent.view import View
from mesh.core import clock, planner
from mesh.core.priority import Estimates
from mesh.pipelines import Models, ModelsFull, Pipeline

log = logging.getLogger(__name__)

NOT_BOUNDED_MB = 1 << 30  # the model memory of an agent that does not bound it
MAX_DEMAND = 256  # models an agent gossips its demand for, the most asked first
FleetKey = tuple[str, float, int]  # an agent as a change of fleet is told: name, weight, room


@runtime_checkable
class Warmable(Protocol):
    """A pipeline that can load a model ahead of its tasks and says how big it is."""

    def load(self, model: str) -> Awaitable[None]: ...

    def memory_mb(self, model: str) -> int: ...


class Planning:
    def __init__(
        self,
        me: str,
        view: View,
        models: Models,
        executor: Executor,
        estimates: Estimates,
        pipelines: dict[str, Pipeline],
        decisions: DecisionLog | None,
        interval_s: float,
        acting: bool = True,
        monotonic: Callable[[], float] = clock.monotonic,
    ) -> None:
        """``interval_s``: how often it plans; ``acting``: whether it acts on the plan
        (off, it only publishes its demand and shows the plan). The GPU memory models may
        fill is ``models.capacity_mb``, each model's size what its pipeline declares."""
        self._me = me
        self._view = view
        self._models = models
        self._executor = executor
        self._estimates = estimates
        self._warmers = [p for p in pipelines.values() if isinstance(p, Warmable)]
        self._decisions = decisions
        self._interval_s = interval_s
        self._acting = acting
        self._clock = monotonic
        self.plan: planner.Plan | None = None  # as this agent last computed it
        self.hosting: frozenset[str] = frozenset()  # what we announce: our part, and keeping
        self._basis: dict[str, float] = {}  # the demand the plan was made for
        self.demand: dict[str, float] = {}  # work asked of the DC per model, last step
        self._fleet: list[FleetKey] = []  # and the agents, as they were
        # Each agent as a host and as the fleet compares it, kept from step to step so
        # that an unchanged agent is the same objects (few long-lived objects made a step).
        self._hosts: dict[str, tuple[planner.Host, FleetKey]] = {}
        self._warming: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.step()

    async def step(self) -> None:
        """Publish our demand, plan, take on our part, and warm one model if idle. Its
        work grows with the DC (every agent is a host), so it lets the loop run between
        its parts, and runs without the garbage collector, whose full collections it
        would otherwise set off (``lag.collections_paused``)."""
        with collections_paused():
            own = planner.most_asked(self.own_demand(), MAX_DEMAND)
            self._view.gossiper.update_own(demand=own, model_mb=self._models.capacity_mb)
            demand, hosts = self.inputs(own)
            self.demand = demand
            await asyncio.sleep(0)
            fleet = [self._hosts[h.name][1] for h in hosts]
            sizes = self.sizes(demand)
            if self._stale(demand, hosts, fleet, sizes):
                await asyncio.sleep(0)
                self._replan(demand, hosts, fleet, sizes)
            await asyncio.sleep(0)
            if self._acting:
                self._act()

    def _stale(
        self,
        demand: dict[str, float],
        hosts: list[planner.Host],
        fleet: list[FleetKey],
        sizes: dict[str, int],
    ) -> bool:
        """Whether to plan again: the agents changed, demand drifted, or a model with
        demand has no home while an agent has room."""
        return (
            self.plan is None
            or fleet != self._fleet
            or planner.drifted(self._basis, demand)
            or planner.homeless(self.plan, demand, hosts, sizes)
        )

    def _replan(
        self,
        demand: dict[str, float],
        hosts: list[planner.Host],
        fleet: list[FleetKey],
        sizes: dict[str, int],
    ) -> None:
        announced = planner.Plan(self.homes())
        made = planner.plan(demand, hosts, announced, sizes)
        if self.plan is None or made.homes != self.plan.homes:
            log.info("placement plan: %s", {m: list(a) for m, a in made.homes.items()})
            if self._decisions is not None:
                self._decisions.plan(demand, hosts, announced, made, sizes)
        self.plan, self._basis, self._fleet = made, demand, fleet

    def _act(self) -> None:
        """Take on our part of the plan (and what we keep), announce it, route by the
        homes announced, and warm one of our models."""
        assert self.plan is not None
        hosting = self.plan.for_agent(self._me) | self._keeping()
        if hosting != self.hosting:
            self.hosting = hosting
            self._view.gossiper.update_own(hosting=tuple(sorted(hosting)))
        self._view.router.set_homes(self.homes())
        self._models.planned = self.hosting
        self._warm_one()

    def _keeping(self) -> frozenset[str]:
        """What we host beyond our part (``planner.keeping``), from gossip; a draining
        agent is no one's home (routers send it nothing), so it neither keeps nor counts."""
        assert self.plan is not None
        members = self._view.router.members
        if self._me not in members or members[self._me].draining:
            return frozenset()
        states = [
            s
            for s in self._view.gossiper.table.states()
            if s.agent_id in members and not members[s.agent_id].draining
        ]
        holds = {s.agent_id: frozenset(s.loaded) for s in states}
        holds[self._me] = self._models.present
        announced = {s.agent_id: frozenset(s.hosting) for s in states}
        return planner.keeping(self._me, self.hosting, self.plan, holds, announced)

    def homes(self) -> dict[str, tuple[str, ...]]:
        """Each model's homes as the agents announced them (their part of the plan, in
        gossip; ours as we took it): what every router routes by, so all agree."""
        homes: dict[str, list[str]] = {}
        states = {s.agent_id: s.hosting for s in self._view.gossiper.table.states()}
        for agent_id, models in sorted((states | {self._me: tuple(self.hosting)}).items()):
            if agent_id not in self._view.router.members:
                continue
            for model in models:
                homes.setdefault(model, []).append(agent_id)
        return {model: tuple(agents) for model, agents in homes.items()}

    def own_demand(self) -> dict[str, float]:
        """Work asked of this agent per model, GPU-seconds a second: its recent arrivals
        times its own learned run time (so what it gossips means the same to everyone,
        and every agent plans from the same numbers)."""
        rates = self._models.demand.rates(self._clock())
        return {m: rate * self._estimates.for_model(m) for m, rate in rates.items()}

    def inputs(self, own: dict[str, float]) -> tuple[dict[str, float], list[planner.Host]]:
        """The planner's view: work asked per model across the DC, as each agent
        gossiped it (``own``: ours, fresher than our gossip), and every active agent with
        its room and models."""
        router = self._view.router
        work: Counter[str] = Counter()
        states = {s.agent_id: s for s in self._view.gossiper.table.states()}
        rooms = {agent_id: state.model_mb for agent_id, state in states.items()}
        rooms[self._me] = self._models.capacity_mb
        asked = {agent_id: state.demand for agent_id, state in states.items()}
        for demand in (asked | {self._me: own}).values():
            for model, rate in demand.items():
                work[model] += rate
        members, hosts, kept = router.members, [], {}
        for agent_id in sorted(members):
            member = members[agent_id]
            if member.draining:
                continue
            room, loaded = rooms.get(agent_id) or NOT_BOUNDED_MB, router.loaded_on(agent_id)
            known = self._hosts.get(agent_id)
            was = known[0] if known else None
            if was is None or (was.weight, was.room, was.loaded) != (member.weight, room, loaded):
                host = planner.Host(agent_id, member.weight, room, loaded)
                known = (host, (agent_id, host.weight, host.room))
            kept[agent_id] = known
            hosts.append(known[0])
        self._hosts = kept
        return dict(work), hosts

    def sizes(self, demand: Mapping[str, float]) -> dict[str, int]:
        """Each asked model's GPU memory, MB, as our pipeline declares it (agents of a DC
        share their pipelines' config, so all plan with the same sizes); 1 MB where no
        pipeline says (the plan is then bounded by nothing but the agents' memory)."""
        if not self._warmers:
            return {}
        sized = self._warmers[0].memory_mb
        return {model: max(1, sized(model)) for model in demand}

    def hosting_of(self, agent_id: str) -> frozenset[str]:
        """The models ``agent_id`` took on from the plan: ours as we took them, a peer's
        as it last announced them."""
        if agent_id == self._me:
            return self.hosting
        state = self._view.gossiper.table.get(agent_id)
        return frozenset(state.hosting) if state else frozenset()

    def demand_of(self, agent_id: str) -> dict[str, float]:
        """Work asked of ``agent_id`` per model, lately (GPU-seconds a second): ours as
        counted, a peer's as it last gossiped."""
        if agent_id == self._me:
            return self.own_demand()
        state = self._view.gossiper.table.get(agent_id)
        return dict(state.demand) if state else {}

    def _warm_one(self) -> None:
        if self._warming is not None and not self._warming.done():
            return
        executor = self._executor
        if executor.queued or executor.running >= executor.slots or not self._warmers:
            return
        models, sized = self._models, self._warmers[0].memory_mb
        cold = sorted(
            m
            for m in models.planned - models.loaded - models.loading
            if not models.capacity_mb or sized(m) <= models.capacity_mb  # else split, not held
        )
        if cold:
            self._warming = observed(
                asyncio.create_task(self._warm(cold[0]), name=f"warm {cold[0]}"), "model warm-up"
            )

    async def _warm(self, model: str) -> None:
        pipeline = self._warmers[0]
        try:
            loaded = await self._models.ensure(
                model,
                lambda: pipeline.load(model),
                pipeline.memory_mb(model),
                evict_planned=False,
            )
        except ModelsFull as exc:
            log.info("not warming %s: %s", model, exc)
            return
        if loaded:
            log.info("warmed model %s, which the placement plan gives this agent", model)
