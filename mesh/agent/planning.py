"""This agent's part in model placement: publish its demand, compute the DC's plan, warm
what the plan gives it.

Every ``plan_interval_s`` the agent gossips the models asked of it (a decaying rate of
arrivals) and the models its GPU memory holds; from every agent's gossip it computes the
same plan as its peers do (``mesh.core.planner``: a pure function of one shared view, so
no agent decides for another), tells its router the homes, tells its ``Models`` which
models are its own to keep, and warms one of its planned models that is not loaded, only
while a slot is idle and nothing waits (warming never delays a task, and never evicts a
model the plan gives it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from mesh.agent.decisionlog import DecisionLog
from mesh.agent.executor import Executor
from mesh.agent.view import View
from mesh.core import planner
from mesh.core.priority import Estimates
from mesh.pipelines import Models, ModelsFull, Pipeline

log = logging.getLogger(__name__)

DEFAULT_ROOM = 64  # models an agent that declares no model memory is taken to hold
MAX_DEMAND = 256  # models an agent gossips its demand for, the most asked first


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
        decisions: Callable[[], DecisionLog | None],
        room: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``room``: the models this agent's GPU memory holds at once (0: not bounded);
        ``interval_s``: how often it plans."""
        self._me = me
        self._view = view
        self._models = models
        self._executor = executor
        self._estimates = estimates
        self._warmers = [p for p in pipelines.values() if isinstance(p, Warmable)]
        self._decisions = decisions
        self._room = room
        self._interval_s = interval_s
        self._clock = clock
        self.plan: planner.Plan | None = None
        self._warming: asyncio.Task[None] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.step()

    def step(self) -> None:
        """Publish, plan, and warm one model if a slot is idle."""
        rates = self._models.demand.rates(self._clock())
        top = sorted(rates, key=lambda m: -rates[m])[:MAX_DEMAND]
        self._view.gossiper.update_own(
            demand={m: float(f"{rates[m]:.2g}") for m in top}, room=self._room
        )
        demand, hosts = self.inputs({m: rates[m] for m in top})
        made = planner.plan(demand, hosts, self.plan)
        if self.plan is None or made.homes != self.plan.homes:
            log.info("placement plan: %s", {m: list(a) for m, a in made.homes.items()})
            if (decisions := self._decisions()) is not None:
                decisions.plan(demand, hosts, self.plan, made)
        self.plan = made
        self._view.router.set_homes(dict(made.homes))
        self._models.planned = made.for_agent(self._me)
        self._warm_one()

    def inputs(self, own: dict[str, float]) -> tuple[dict[str, float], list[planner.Host]]:
        """The planner's view: work asked per model across the DC (arrivals a second
        times expected run seconds; ``own``: this agent's arrivals, fresher than its
        gossip), and every active agent with its room and models."""
        router = self._view.router
        work: Counter[str] = Counter()
        states = {s.agent_id: s for s in self._view.gossiper.table.states()}
        rooms = {agent_id: state.room for agent_id, state in states.items()}
        rooms[self._me] = self._room
        asked = {agent_id: state.demand for agent_id, state in states.items()}
        for demand in (asked | {self._me: own}).values():
            for model, rate in demand.items():
                work[model] += rate * self._estimates.for_model(model)
        hosts = [
            planner.Host(
                agent_id,
                member.weight,
                rooms.get(agent_id) or DEFAULT_ROOM,
                router.loaded_on(agent_id),
            )
            for agent_id, member in sorted(router.members.items())
            if not member.draining
        ]
        return dict(work), hosts

    def demand_of(self, agent_id: str) -> dict[str, float]:
        """Tasks a second asked of ``agent_id`` per model, lately: ours as counted, a
        peer's as it last gossiped."""
        if agent_id == self._me:
            return self._models.demand.rates(self._clock())
        state = self._view.gossiper.table.get(agent_id)
        return dict(state.demand) if state else {}

    def _warm_one(self) -> None:
        if self._warming is not None and not self._warming.done():
            return
        executor = self._executor
        if executor.queued or executor.running >= executor.slots or not self._warmers:
            return
        models = self._models
        cold = sorted(models.planned - models.loaded - models.loading)
        if cold:
            self._warming = asyncio.create_task(self._warm(cold[0]), name=f"warm {cold[0]}")

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
