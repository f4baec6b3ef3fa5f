"""``python -m bench route [--json]``: the router's speed, and its placements beside baselines.

Two parts, both measured in the same run as their baselines:

* **Decision latency** of ``Router.route`` at 10 to 10,000 agents (heterogeneous GPUs, a
  loaded mesh, Zipf-popular models), beside a plain ring lookup and a least-loaded scan.
* **Placement quality**: a discrete-event simulation of a skewed workload on heterogeneous
  GPUs where running a model an agent has not loaded costs a load delay and each agent
  keeps only as many models as its GPU memory holds (LRU). Every policy sees the same
  trace: random, round-robin, plain consistent hashing, least-loaded, power-of-two, ours
  (``mesh.core.router``), ours with the placement planner (``mesh.core.planner``: homes
  per model from demand, warmed on idle slots, kept from eviction, preferred by the
  router), and an omniscient central scheduler that knows every queue and picks the
  earliest finish time.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.core import conserve, eta, planner
from mesh.core.ring import HashRing, key_point
from mesh.core.router import Router
from mesh.core.routing import AGENT, Member, Policy, Request
from mesh.gpus import DEFAULT_GPU_WEIGHTS

# (class, memory GB, share of the fleet)
FLEET_MIX = [("H100", 80, 0.25), ("A100", 80, 0.3), ("L40S", 48, 0.25), ("A40", 48, 0.2)]
PIPELINE = "sleep"
MARGIN_S = 0.5  # a queued task moves only to save more than this (as mesh.agent.conserve)
# The planner's settings in this run: how far past the bound a model's planned home may
# queue (tasks per unit of GPU weight), how often it replans, over how long demand is
# averaged, and how much room beyond its share a model's homes get.
HOME_SLACK, REPLAN_S, DEMAND_WINDOW_S, HEADROOM = 1.5, 5.0, 90.0, 1.25


def zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1 / (rank**s) for rank in range(1, n + 1)]


@dataclass
class Agent:
    name: str
    gpu_class: str
    memory_gb: int
    slots: int

    @property
    def speed(self) -> float:
        return DEFAULT_GPU_WEIGHTS[self.gpu_class]

    @property
    def weight(self) -> float:
        return self.speed * self.slots

    @property
    def model_capacity(self) -> int:
        return max(1, self.memory_gb // 24)

    def member(self) -> Member:
        memory = (self.memory_gb * 1024,) * self.slots
        return Member(self.name, self.weight, memory, frozenset({PIPELINE}), queue_limit=10**6)


def make_fleet(n: int, rng: random.Random) -> list[Agent]:
    classes = [(c, m) for c, m, _ in FLEET_MIX]
    shares = [s for *_, s in FLEET_MIX]
    fleet = []
    for i in range(n):
        cls, memory = rng.choices(classes, shares)[0]
        fleet.append(Agent(f"agent-{i:05d}", cls, memory, rng.choice([1, 2, 4, 8])))
    return fleet


# -- decision latency ----------------------------------------------------------------------


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    samples_ns.sort()
    p50 = samples_ns[len(samples_ns) // 2] / 1000
    p99 = samples_ns[int(len(samples_ns) * 0.99)] / 1000
    return round(p50, 2), round(p99, 2)


def latency(sizes: list[int], requests: int, seed: int) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {
        k: {} for k in ("p50_us", "p99_us", "ring_p50_us", "least_loaded_p50_us")
    }
    for n in sizes:
        rng = random.Random(seed)
        fleet = make_fleet(n, rng)
        router = Router()
        router.set_members(a.member() for a in fleet)
        for agent in fleet:  # a loaded mesh: about 70% of slots busy, a few queued
            busy = sum(rng.random() < 0.7 for _ in range(agent.slots))
            router.set_load(agent.name, busy, rng.choice([0, 0, 0, 1]))
        models = [f"model-{m:02d}" for m in range(20)]
        weights = zipf_weights(len(models))
        asks = [
            Request(f"task-{i}", rng.choices(models, weights)[0], PIPELINE) for i in range(requests)
        ]
        for request in asks[:200]:  # warm the per-class rings and caches
            router.route(request)
        samples = []
        for request in asks:
            started = time.perf_counter_ns()
            router.route(request)
            samples.append(time.perf_counter_ns() - started)
        out["p50_us"][n], out["p99_us"][n] = _percentiles(samples)

        ring = HashRing({a.name: a.weight for a in fleet})
        samples = []
        for request in asks[: requests // 4]:
            started = time.perf_counter_ns()
            ring.owner(key_point(request.key))
            samples.append(time.perf_counter_ns() - started)
        out["ring_p50_us"][n] = _percentiles(samples)[0]

        loads = {a.name: router.tasks_of(a.name) / a.weight for a in fleet}
        samples = []
        for _ in asks[: min(requests // 4, 2000)]:
            started = time.perf_counter_ns()
            min(loads, key=loads.__getitem__)
            samples.append(time.perf_counter_ns() - started)
        out["least_loaded_p50_us"][n] = _percentiles(samples)[0]
    return out


# -- placement quality -----------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    task_id: str
    model: str
    arrival: float
    work: float  # seconds on an H100 (speed 1.0)


@dataclass
class AgentState:
    agent: Agent
    running: int = 0
    queue: deque[Task] = field(default_factory=deque)
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)
    busy_until: list[float] = field(default_factory=list)  # heap: finish of each run
    area: float = 0.0  # integral of (running + queued) / GPU weight over time
    last: float = 0.0
    planned: frozenset[str] = frozenset()  # what the placement plan gives it (if any)
    warming: set[str] = field(default_factory=set)

    @property
    def tasks(self) -> int:
        return self.running + len(self.queue)

    def account(self, now: float) -> None:
        self.area += (now - self.last) * self.tasks / self.agent.weight
        self.last = now


@dataclass(frozen=True)
class Trace:
    fleet: list[Agent]
    tasks: list[Task]
    load_delay_s: float


def make_trace(seed: int, agents: int, models: int, tasks: int, utilisation: float) -> Trace:
    rng = random.Random(seed)
    fleet = make_fleet(agents, rng)
    names = [f"model-{m:02d}" for m in range(models)]
    popularity = zipf_weights(models)
    mean_work = 2.0
    capacity = sum(a.slots * a.speed for a in fleet)  # H100-seconds per second
    rate = utilisation * capacity / mean_work
    now, out = 0.0, []
    for i in range(tasks):
        now += rng.expovariate(rate)
        work = rng.lognormvariate(math.log(mean_work) - 0.125, 0.5)
        out.append(Task(f"task-{i}", rng.choices(names, popularity)[0], now, work))
    return Trace(fleet, out, load_delay_s=6.0)


Policy_ = Callable[[Task, dict[str, AgentState], float], str]
Planner = Callable[[Task, dict[str, AgentState], float], None]


def _load(state: AgentState, model: str) -> None:
    """Load ``model``; past the agent's room, evict the least recently used model the plan
    does not give it (the least recently used of all if the plan gives it every one)."""
    state.loaded[model] = None
    state.loaded.move_to_end(model)
    while len(state.loaded) > state.agent.model_capacity:
        spare = [m for m in state.loaded if m not in state.planned and m != model]
        victim = spare[0] if spare else next(m for m in state.loaded if m != model)
        del state.loaded[victim]


@dataclass(frozen=True)
class Setup:
    """A policy under test: where each task goes, what keeps its view told, the planner
    it runs (if any), and the view queued tasks move by to idle agents (if it conserves
    work, ``mesh.core.conserve``)."""

    choose: Policy_
    tell: Callable[[AgentState], None]
    plan: Planner | None = None
    conserve: Router | None = None


def _waiting(state: AgentState, now: float, load_s: float) -> list[conserve.Waiting]:
    """The agent's queue with each task's expected start (``mesh.core.eta``), as the
    agent's executor computes it: runs and loads known exactly, as the sleep pipeline's
    estimate is."""
    agent, warm = state.agent, set(state.loaded)
    costs = []
    for task in state.queue:
        costs.append((1, task.work / agent.speed + (0.0 if task.model in warm else load_s)))
        warm.add(task.model)
    free = [t - now for t in state.busy_until] + [0.0] * (agent.slots - state.running)
    starts = eta.starts(free, costs)
    return [
        conserve.Waiting(t.task_id, (PIPELINE, t.model, 1, 0), s)
        for t, s in zip(state.queue, starts, strict=True)
    ]


def simulate(trace: Trace, setup: Setup) -> dict:
    choose, on_change, planner, view = setup.choose, setup.tell, setup.plan, setup.conserve
    states = {a.name: AgentState(a) for a in trace.fleet}
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    for task in trace.tasks:
        heapq.heappush(events, (task.arrival, next(seq), "arrive", task))
    finished: list[float] = []
    hits = 0

    def start(state: AgentState, now: float) -> None:
        nonlocal hits
        while state.running < state.agent.slots and state.queue:
            task = state.queue.popleft()
            cost = task.work / state.agent.speed
            if task.model in state.loaded:
                hits += 1
                state.loaded.move_to_end(task.model)
            else:
                cost += trace.load_delay_s
                _load(state, task.model)
            state.running += 1
            heapq.heappush(state.busy_until, now + cost)
            heapq.heappush(events, (now + cost, next(seq), "finish", (state.agent.name, task)))
        warm(state, now)

    def warm(state: AgentState, now: float) -> None:
        """On an idle slot (nothing queued), load a model the plan gives this agent."""
        wanted = [m for m in sorted(state.planned) if m not in state.loaded]
        for model in wanted:
            if state.queue or state.running >= state.agent.slots or model in state.warming:
                continue
            state.warming.add(model)
            state.running += 1
            done = now + trace.load_delay_s
            heapq.heappush(state.busy_until, done)
            heapq.heappush(events, (done, next(seq), "warmed", (state.agent.name, model)))

    def conserve_now(now: float) -> None:
        """Every queue's tasks that start sooner on an idle agent move there."""
        assert view is not None
        for name, state in states.items():
            if not state.queue or not view.idle - {name}:
                continue
            waiting = _waiting(state, now, trace.load_delay_s)
            found = conserve.moves(view, name, waiting, lambda _: trace.load_delay_s, MARGIN_S)
            for move in found:
                task = next(t for t in state.queue if t.task_id == move.task_id)
                target = states[move.agent_id]
                state.account(now)
                target.account(now)
                state.queue.remove(task)
                target.queue.append(task)
                start(target, now)
                on_change(target)
            if found:
                on_change(state)

    idle_queued, last = 0.0, 0.0  # slot-seconds idle while a task waited in some queue
    past_bound = 0.0  # of those, while the task had waited longer than a load and the margin
    bound_s = trace.load_delay_s + MARGIN_S
    while events:
        now, _, kind, data = heapq.heappop(events)
        idle = sum(s.agent.slots - s.running for s in states.values())
        idle_queued += (now - last) * min(idle, sum(len(s.queue) for s in states.values()))
        long_waits = sum(1 for s in states.values() for t in s.queue if last - t.arrival > bound_s)
        past_bound += (now - last) * min(idle, long_waits)
        last = now
        if kind == "warmed":
            name, model = data  # type: ignore[misc]
            state = states[name]
            state.account(now)
            state.running -= 1
            heapq.heappop(state.busy_until)
            state.warming.discard(model)
            _load(state, model)
            start(state, now)
            on_change(state)
            if view is not None:
                conserve_now(now)
            continue
        if kind == "arrive":
            task = data  # type: ignore[assignment]
            if planner is not None:
                planner(task, states, now)
                for other in states.values():
                    warm(other, now)
            state = states[choose(task, states, now)]
            state.account(now)
            state.queue.append(task)
            start(state, now)
        else:
            name, task = data  # type: ignore[misc]
            state = states[name]
            state.account(now)
            state.running -= 1
            heapq.heappop(state.busy_until)  # the earliest finish on this agent is this one
            finished.append(now - task.arrival)
            start(state, now)
        on_change(state)
        if view is not None:
            conserve_now(now)
    end = max(s.last for s in states.values())
    loads = [s.area / end for s in states.values()]
    finished.sort()
    return {
        "max_over_avg": round(max(loads) / statistics.fmean(loads), 3),
        "affinity": round(hits / len(trace.tasks), 4),
        "mean_jct_s": round(statistics.fmean(finished), 3),
        "p99_jct_s": round(finished[int(len(finished) * 0.99)], 3),
        "idle_slot_s_while_queued": round(idle_queued, 1),
        "idle_slot_s_past_bound": round(past_bound, 1),
    }


def policies(trace: Trace, seed: int) -> dict[str, Setup]:
    names = [a.name for a in trace.fleet]
    by_name = {a.name: a for a in trace.fleet}
    rng = random.Random(seed)
    cycle = itertools.cycle(names)
    ring = HashRing({a.name: a.weight for a in trace.fleet})
    router = Router(Policy())
    router.set_members(a.member() for a in trace.fleet)

    def nothing(_: AgentState) -> None:
        return None

    def weighted_load(states: dict[str, AgentState], name: str) -> float:
        return states[name].tasks / by_name[name].weight

    def least_loaded(task: Task, states: dict[str, AgentState], now: float) -> str:
        return min(names, key=lambda n: (weighted_load(states, n), n))

    def two(task: Task, states: dict[str, AgentState], now: float) -> str:
        return min(rng.sample(names, 2), key=lambda n: weighted_load(states, n))

    def omniscient(task: Task, states: dict[str, AgentState], now: float) -> str:
        """Earliest finish time, from exact knowledge of every slot and queue."""

        def finish(name: str) -> float:
            state, agent = states[name], by_name[name]
            free = sorted(state.busy_until) + [now] * (agent.slots - state.running)
            heapq.heapify(free)
            warm = set(state.loaded)
            for queued in [*state.queue, task]:
                cost = queued.work / agent.speed
                if queued.model not in warm:
                    cost += trace.load_delay_s
                    warm.add(queued.model)
                done = max(now, heapq.heappop(free)) + cost
                heapq.heappush(free, done)
            return done

        return min(names, key=lambda n: (finish(n), n))

    ours, tell = routed(router, trace.load_delay_s)
    planned = Router(Policy(home_slack=HOME_SLACK))
    planned.set_members(a.member() for a in trace.fleet)
    placement = Placement(trace.fleet, planned)
    ours_planned, tell_planned = routed(planned, trace.load_delay_s)
    conserving = Router(Policy(home_slack=HOME_SLACK))
    conserving.set_members(a.member() for a in trace.fleet)
    conserving_placement = Placement(trace.fleet, conserving)
    ours_conserving, tell_conserving = routed(conserving, trace.load_delay_s)

    return {
        "random": Setup(lambda t, s, now: rng.choice(names), nothing),
        "round_robin": Setup(lambda t, s, now: next(cycle), nothing),
        "consistent_hash": Setup(
            lambda t, s, now: ring.owner(key_point(f"{t.model}/{PIPELINE}")), nothing
        ),
        "least_loaded": Setup(least_loaded, nothing),
        "power_of_two": Setup(two, nothing),
        "ours": Setup(ours, tell),
        "ours+planner": Setup(ours_planned, tell_planned, placement.observe),
        "ours+planner+conserve": Setup(
            ours_conserving, tell_conserving, conserving_placement.observe, conserving
        ),
        "omniscient": Setup(omniscient, nothing),
    }


def routed(router: Router, load_s: float) -> tuple[Policy_, Callable[[AgentState], None]]:
    """A policy that asks ``router``, and what keeps the router told of every agent's
    load and loaded models. The request carries the task's run and a load's time, as an
    agent's does (the sleep pipeline's own estimate, the loads it saw)."""

    def choose(task: Task, states: dict[str, AgentState], now: float) -> str:
        request = Request(task.task_id, task.model, PIPELINE, run_s=task.work, load_s=load_s)
        target = router.route(request).first
        assert target.kind == AGENT
        return target.name

    def tell(state: AgentState) -> None:
        router.set_load(state.agent.name, state.running, len(state.queue))
        router.set_loaded(state.agent.name, state.loaded)

    return choose, tell


class Placement:
    """The planner as every agent runs it (``mesh.core.planner``): demand per model, an
    exponentially weighted rate of work arriving, replanned every ``every_s``; each agent
    is told its part (what to warm, what not to evict) and the router the homes."""

    def __init__(
        self,
        fleet: list[Agent],
        router: Router,
        every_s: float = REPLAN_S,
        window_s: float = DEMAND_WINDOW_S,
    ) -> None:
        self._fleet = fleet
        self._router = router
        self._every_s = every_s
        self._window_s = window_s
        self._demand: dict[str, float] = {}
        self._seen_at = 0.0
        self._next_at = 0.0
        self._plan: planner.Plan | None = None
        self.plans = 0

    def observe(self, task: Task, states: dict[str, AgentState], now: float) -> None:
        fade = math.exp(-(now - self._seen_at) / self._window_s)
        self._demand = {m: v * fade for m, v in self._demand.items()}
        self._demand[task.model] = self._demand.get(task.model, 0.0) + task.work / self._window_s
        self._seen_at = now
        if now < self._next_at:
            return
        self._next_at = now + self._every_s
        hosts = [
            planner.Host(a.name, a.weight, a.model_capacity, frozenset(states[a.name].loaded))
            for a in self._fleet
        ]
        self._plan = planner.plan(self._demand, hosts, self._plan, headroom=HEADROOM)
        self.plans += 1
        self._router.set_homes(dict(self._plan.homes))
        for name, state in states.items():
            state.planned = self._plan.for_agent(name)


def quality(seed: int, tasks: int) -> dict[str, dict]:
    trace = make_trace(seed, agents=24, models=20, tasks=tasks, utilisation=0.7)
    return {name: simulate(trace, setup) for name, setup in policies(trace, seed).items()}


# -- the command -----------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench route", description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20_000, help="timed decisions per size")
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks in the simulated trace")
    parser.add_argument("--sizes", default="10,100,1000,10000", help="agent counts to time")
    args = parser.parse_args(argv)
    started = time.monotonic()
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict[str, object] = latency(sizes, args.requests, args.seed)
    result["policies"] = quality(args.seed, args.tasks)
    result["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
        return
    _print(result, sizes)


def _print(result: dict, sizes: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    timing = Table(
        "agents",
        "route p50 µs",
        "route p99 µs",
        "ring lookup p50 µs",
        "least-loaded scan p50 µs",
        title="decision latency",
    )
    for n in sizes:
        timing.add_row(
            str(n),
            str(result["p50_us"][n]),
            str(result["p99_us"][n]),
            str(result["ring_p50_us"][n]),
            str(result["least_loaded_p50_us"][n]),
        )
    console.print(timing)
    table = Table(
        "policy",
        "max/avg load",
        "affinity",
        "mean JCT s",
        "p99 JCT s",
        "idle slot-s while queued",
        "of it past a load + margin",
        title="placement on a skewed trace (same trace for every policy)",
    )
    for name, m in result["policies"].items():
        table.add_row(
            name,
            str(m["max_over_avg"]),
            f"{m['affinity']:.1%}",
            str(m["mean_jct_s"]),
            str(m["p99_jct_s"]),
            str(m["idle_slot_s_while_queued"]),
            str(m["idle_slot_s_past_bound"]),
        )
    console.print(table)
    console.print(f"{result['seconds']} s")
