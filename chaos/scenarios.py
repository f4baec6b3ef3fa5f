"""The fault schedule: one scenario per fault, each an inject, a hold and a heal.

A scenario's ``stage`` breaks something for real (signals to agent processes, SIGKILL to
etcd members, iptables rules and the delay proxy in the WAN namespace), marks each step
in the fault history, and undoes it: a killed process is started again, so the checker
can demand full membership at the end. Its ``figures`` read the timeline afterwards.
"""

from __future__ import annotations

import asyncio
import bisect
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from chaos.checker import Event, first_after, read_events, runs, select
from chaos.load import Load
from chaos.mesh import DCS, ChaosMesh
from chaos.net import Namespaces
from mesh.agent.history import History
from mesh.client import MeshClient


@dataclass
class Staged:
    """What a scenario did, and when (monotonic seconds)."""

    start: float = 0.0
    heal: float = 0.0
    dc: str = ""
    victim: str = ""
    measured: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the fault did not happen as meant


@dataclass
class Context:
    mesh: ChaosMesh
    marks: History
    ttl_s: int
    load: Load  # the steady load; scenarios add bursts and floods to it
    quick: bool = False  # the reduced size CI runs

    def mark(self, phase: str, **fields: object) -> float:
        self.marks.write("fault", phase, **fields)
        return time.monotonic()

    def busiest(self, dc: str | None = None) -> str:
        """The agent running the most tasks now, by the history so far."""
        open_runs: Counter[str] = Counter()
        for event in select(read_events(self.mesh.history_dir), "run"):
            agent = str(event["agent"])
            open_runs[agent] += 1 if event["phase"] == "start" else -1
        names = [a.name for a in self.mesh.agents.values() if dc is None or a.dc == dc]
        return max(names, key=lambda n: (open_runs[n], n))

    async def restart(self, name: str) -> None:
        agent = self.mesh.agents[name]
        if agent.process is not None:
            await asyncio.to_thread(agent.process.wait)
        agent.start()
        self.mark("restart", target=name)


Stage = Callable[[Context, Staged], Awaitable[None]]
Figures = Callable[[list[Event], Staged], dict[str, float | None]]
Checks = Callable[[list[Event], Staged, int], list[str]]


def no_checks(events: list[Event], staged: Staged, ttl_s: int) -> list[str]:
    return []


@dataclass(frozen=True)
class Target:
    """A bound on a figure: ``ttls`` lease TTLs plus ``plus_s`` seconds."""

    figure: str
    ttls: float
    plus_s: float = 0.0

    def limit(self, ttl_s: float) -> float:
        return self.ttls * ttl_s + self.plus_s


DETECT = Target("detect_s", 1)  # a death is known within the lease TTL
RERUN = Target("recover_s", 1, 1)  # its tasks run again within TTL + 1 s
FAILOVER = Target("failover_s", 1, 1)  # a new queue owner within TTL + 1 s
HANDOVER = Target("recover_s", 0, 1)  # a drained agent's work is elsewhere within 1 s

# What the users' code sees during the fault: a drain costs them nothing, a crash little.
DRAIN_ERRORS = 0.0
CRASH_ERRORS = 0.01

BURST_FULL = (3000, 64)  # tasks, Submits in flight at most
BURST_QUICK = (600, 32)
BURST_TASK_S = (0.02, 0.1)
BURST_SETTLE_S = 120.0
STUCK_S = 5.0  # a backlog that holds tasks this long while its DC has idle slots is stuck
SAMPLE_S = 0.5


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    stage: Stage
    figures: Figures
    targets: tuple[Target, ...] = ()
    checks: Checks = no_checks  # the scenario's own invariants, beyond the common ones
    quick: bool = False
    needs: tuple[str, ...] = ()  # "netns", "etcd-3.4"
    settle_s: float = 60.0  # every accepted task must end this long after the fault cleared
    max_error_rate: float | None = None  # of the Submits sent during the fault


# -- figures --------------------------------------------------------------------------------


def _since(t: float | None, origin: float) -> float | None:
    return None if t is None else round(t - origin, 3)


def rerun_time(events: list[Event], staged: Staged) -> float | None:
    """Until the last task written off with the victim runs again (its next attempt)."""
    latest = None
    for requeue in select(events, "requeue", "requeued", dead=staged.victim):
        if float(requeue["mono"]) < staged.start:  # type: ignore[arg-type]
            continue
        again = first_after(
            events, float(requeue["mono"]), "run", "start",  # type: ignore[arg-type]
            task=requeue["task"], attempt=requeue["attempt"],
        )  # fmt: skip
        if again is None:
            return None  # never ran again: the lost-task check says why
        latest = max(latest or again, again)
    return _since(latest, staged.start)


def agent_death(events: list[Event], staged: Staged) -> dict[str, float | None]:
    detected = first_after(events, staged.start, "departed", "seen", member=staged.victim)
    return {"detect_s": _since(detected, staged.start), "recover_s": rerun_time(events, staged)}


def owner_death(events: list[Event], staged: Staged) -> dict[str, float | None]:
    successor = next(
        (
            float(e["mono"])  # type: ignore[arg-type]
            for e in select(events, "owner", "elected", dc=staged.dc)
            if float(e["mono"]) >= staged.start and e["agent"] != staged.victim  # type: ignore[arg-type]
        ),
        None,
    )
    figures = agent_death(events, staged)
    figures["failover_s"] = _since(successor, staged.start)
    figures["detect_s"] = figures["detect_s"] or figures["failover_s"]
    return figures


def handover(events: list[Event], staged: Staged) -> dict[str, float | None]:
    """Graceful stop: until the last job the victim gave back was placed elsewhere."""
    handed = [
        float(e["mono"])  # type: ignore[arg-type]
        for e in select(events, "handback", "ok", agent=staged.victim)
        if float(e["mono"]) >= staged.start  # type: ignore[arg-type]
    ]
    return {"detect_s": 0.0, "recover_s": _since(max(handed, default=None), staged.start)}


def etcd_trouble(events: list[Event], staged: Staged) -> dict[str, float | None]:
    """Agents notice (a lease refresh fails); the DC runs tasks again after the heal."""
    noticed = first_after(events, staged.start, "lease", "trouble", dc=staged.dc)
    figures = {
        "detect_s": _since(noticed, staged.start),
        "recover_s": _since(
            first_after(events, staged.heal, "run", "start", dc=staged.dc), staged.heal
        ),
    }
    figures.update(staged.measured)
    return figures


def measured(events: list[Event], staged: Staged) -> dict[str, float | None]:
    return dict(staged.measured)


# -- the scenarios' own invariants -------------------------------------------------------


def fenced_on_waking(events: list[Event], staged: Staged, ttl_s: int) -> list[str]:
    """The paused owner's first queue write after it woke was refused by the fence. An
    owner that saw its term end on waking and stepped down before writing anything needed
    no fence: noted, not a failure (the fence is proved on the runs where it wrote). A
    write applied before the pause whose answer the stopped process read only on waking
    is not a woken write: its revision comes before the DC's writes made meanwhile
    (seed 6: a claim at revision 146, recorded on waking after the successor's at 214+)."""
    meanwhile = max(
        (
            int(e["rev"])  # type: ignore[call-overload]
            for e in events
            if e.get("dc") == staged.dc and "rev" in e
            and float(e["mono"]) < staged.heal  # type: ignore[arg-type]
        ),
        default=0,
    )  # fmt: skip
    woken = [
        e for e in events
        if e["op"] in ("claim", "requeue") and e["agent"] == staged.victim
        and float(e["mono"]) >= staged.heal  # type: ignore[arg-type]
        and not (e["phase"] == "ok" and int(e.get("rev") or 0) <= meanwhile)  # type: ignore[call-overload]
    ]  # fmt: skip
    if not woken:
        staged.notes.append("the woken owner stepped down before any queue write: no fence needed")
        return []
    first = woken[0]
    if first["phase"] != "rejected":
        return [f"the woken owner's first write ({first['op']} {first.get('task')}) succeeded"]
    staged.notes.append(
        f"woken owner's first write ({first['op']}, token {first['token']}) was rejected"
    )
    return []


def outlived_etcd_outage(events: list[Event], staged: Staged, ttl_s: int) -> list[str]:
    """While etcd could not decide anything, nobody in the DC was declared dead, and the
    runs under way committed their results where they ran once etcd was back."""
    window = (staged.start, staged.heal + ttl_s)
    wrong = [
        f"{e['op']} {e['phase']} by {e['agent']}"
        for e in events
        if e.get("dc") == staged.dc and window[0] <= float(e["mono"]) <= window[1]  # type: ignore[arg-type]
        and (e["op"] == "requeue" or (e["op"] == "lease" and e["phase"] == "lost"))
    ]  # fmt: skip
    sent_here = {str(e["key"]) for e in select(events, "submit", "invoke", target_dc=staged.dc)}
    overflowed = sum(
        1
        for e in select(events, "submit", "ok")
        if str(e["key"]) in sent_here and e.get("dc") != staged.dc
        and window[0] <= float(e["mono"]) <= staged.heal  # type: ignore[arg-type]
    )  # fmt: skip
    staged.notes.append(
        f"{overflowed} task(s) sent to {staged.dc} during the fault ran in another DC"
    )
    under_way = [
        run for run in runs(events)
        if run.agent.startswith(staged.dc) and run.start < staged.start < run.end
    ]  # fmt: skip
    committed = {
        (str(e["task"]), str(e["agent"]), int(e["attempt"]))  # type: ignore[call-overload]
        for e in select(events, "commit", "ok")
    }
    cut_short = [r.task for r in under_way if (r.task, r.agent, r.attempt) not in committed]
    staged.notes.append(
        f"{len(under_way) - len(cut_short)} of {len(under_way)} run(s) under way when etcd "
        "went down committed their result where they ran"
    )
    return [f"false failover during the etcd outage: {w}" for w in wrong[:5]] + [
        f"the run of {task} under way at the outage did not commit where it ran"
        for task in cut_short
    ]


def backlog_kept_moving(events: list[Event], staged: Staged, ttl_s: int) -> list[str]:
    """No DC kept tasks in its backlog for ``STUCK_S`` while it had idle slots (sampled
    from etcd and an agent's view) and its queue owner took none of them out: a backlog
    that stops moving fails the scenario even if its tasks end by their deadline later.
    One that drains while a slot or two stay free between samples (short runs ending
    faster than one owner dispatches) is moving (seeds 5 and 6 of the full burst)."""
    problems = []
    for dc in DCS:
        samples = list(select(events, "sample", "backlog", dc=dc))
        taken = sorted(float(e["mono"]) for e in select(events, "claim", "ok", dc=dc))  # type: ignore[arg-type]
        peak = max((int(e["depth"]) for e in samples), default=0)  # type: ignore[call-overload]
        longest, since = 0.0, None
        for e in samples:
            at = float(e["mono"])  # type: ignore[arg-type]
            idle = int(e["depth"]) and int(e.get("idle") or 0)  # type: ignore[call-overload]
            moved = since is not None and bisect.bisect_left(taken, since) < bisect.bisect_right(
                taken, at
            )
            if idle and not moved:
                since = at if since is None else since
                longest = max(longest, at - since)
            else:
                since = at if idle else None
        staged.notes.append(
            f"{dc}: backlog peaked at {peak}; longest wait with idle slots {longest:.1f}s"
        )
        if longest > STUCK_S:
            problems.append(f"{dc}'s backlog held tasks for {longest:.1f}s while it had idle slots")
    return problems


# -- stages ---------------------------------------------------------------------------------


async def agent_signal(ctx: Context, staged: Staged, sig: signal.Signals, victim: str) -> None:
    agent = ctx.mesh.agents[victim]
    staged.victim, staged.dc = victim, agent.dc
    phase = {signal.SIGKILL: "kill", signal.SIGTERM: "term", signal.SIGSTOP: "stop"}[sig]
    staged.start = ctx.mark(phase, target=victim, dc=agent.dc)
    agent.signal(sig)
    if sig == signal.SIGSTOP:
        await asyncio.sleep(ctx.ttl_s + 2)
        staged.heal = ctx.mark("cont", target=victim)
        agent.signal(signal.SIGCONT)
        return
    if sig == signal.SIGKILL:
        await asyncio.sleep(ctx.ttl_s + 2)
        staged.heal = time.monotonic()
    else:  # SIGTERM: the fault lasts until the agent has drained and exited
        assert agent.process is not None
        await asyncio.to_thread(agent.process.wait)
        staged.heal = ctx.mark("exited", target=victim)
    await ctx.restart(victim)


async def agent_kill(ctx: Context, staged: Staged) -> None:
    await agent_signal(ctx, staged, signal.SIGKILL, ctx.busiest())


async def agent_term(ctx: Context, staged: Staged) -> None:
    # Fill the DC's queues first, so that the drained agent has queued work to hand over.
    ctx.load.burst("west", 24)
    await asyncio.sleep(0.5)
    await agent_signal(ctx, staged, signal.SIGTERM, ctx.busiest("west"))


async def agent_stop(ctx: Context, staged: Staged) -> None:
    await agent_signal(ctx, staged, signal.SIGSTOP, ctx.busiest())


async def owner_kill(ctx: Context, staged: Staged) -> None:
    owner = await ctx.mesh.owner("west")
    assert owner is not None, "west has no queue owner"
    ctx.load.burst("west", 8)  # the owner runs tasks too: some of them die with it
    await asyncio.sleep(0.5)
    await agent_signal(ctx, staged, signal.SIGKILL, owner)


async def owner_stop(ctx: Context, staged: Staged) -> None:
    owner = await ctx.mesh.owner("west")
    assert owner is not None, "west has no queue owner"
    # A backlog in the paused owner's view, so that it has work to claim when it wakes.
    ctx.load.burst("west", 40)
    await asyncio.sleep(1)
    await agent_signal(ctx, staged, signal.SIGSTOP, owner)
    await asyncio.sleep(2)  # let it wake, find itself deposed and stand again


async def _poll(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await check():
            return round(time.monotonic() - started, 3)
        await asyncio.sleep(0.05)
    return None


async def etcd_leader_kill(ctx: Context, staged: Staged) -> None:
    staged.dc = "west"
    leader = await ctx.mesh.etcd_leader("west")
    assert leader is not None and leader.process is not None, "west's etcd has no leader"
    staged.victim = leader.name
    staged.start = ctx.mark("kill-etcd", target=leader.name, dc="west")
    leader.process.kill()
    leader.process.wait()

    async def new_leader() -> bool:
        return await ctx.mesh.etcd_leader("west") is not None

    staged.measured["detect_s"] = await _poll(new_leader, 10)  # a new leader elected
    await _poll(lambda: ctx.mesh.etcd_writable("west"), 10)
    staged.measured["recover_s"] = round(time.monotonic() - staged.start, 3)  # writable again
    await asyncio.sleep(3)
    staged.heal = ctx.mark("restart-etcd", target=leader.name)
    leader.start(ctx.mesh.workdir / "logs" / f"{leader.name}.log")
    await asyncio.to_thread(leader.wait_healthy, 20)


async def _etcd_down(ctx: Context, staged: Staged, dc: str, count: int) -> None:
    staged.dc = dc
    members = ctx.mesh.etcd[dc][:count]
    staged.victim = ",".join(m.name for m in members)
    staged.start = ctx.mark("kill-etcd", target=staged.victim, dc=dc)
    for member in members:
        assert member.process is not None
        member.process.kill()
        member.process.wait()
    await asyncio.sleep(1)
    probed = time.monotonic()
    refused = await ctx.mesh.etcd_write_error(dc)
    if refused is None:
        staged.failures.append(f"{dc}'s etcd accepted a write during the outage")
    else:
        staged.notes.append(
            f"a write to {dc}'s etcd during the outage was refused after "
            f"{time.monotonic() - probed:.2f}s: {refused}"
        )
    await asyncio.sleep(2 * ctx.ttl_s)  # past the TTL: no lease may be declared dead
    staged.heal = ctx.mark("restart-etcd", target=staged.victim)
    for member in members:
        member.start(ctx.mesh.workdir / "logs" / f"{member.name}.log")
    for member in members:
        await asyncio.to_thread(member.wait_healthy, 20)


async def etcd_quorum_loss(ctx: Context, staged: Staged) -> None:
    await _etcd_down(ctx, staged, "west", 2)


async def dc_etcd_down(ctx: Context, staged: Staged) -> None:
    await _etcd_down(ctx, staged, "east", 1)


async def dc_partition(ctx: Context, staged: Staged) -> None:
    net = ctx.mesh.net
    assert isinstance(net, Namespaces)
    staged.dc = "west|east"
    staged.start = ctx.mark("partition")
    await asyncio.to_thread(net.partition, True)
    await asyncio.sleep(2 * ctx.ttl_s)
    dropped = await asyncio.to_thread(net.dropped)
    staged.heal = ctx.mark("heal", dropped=dropped)
    await asyncio.to_thread(net.partition, False)
    staged.notes.append(f"the partition dropped {dropped} packets between the DCs")
    if not dropped:
        staged.failures.append("no packet crossed the partition: the fault was not exercised")


async def wan_latency_loss(ctx: Context, staged: Staged) -> None:
    net = ctx.mesh.net
    assert isinstance(net, Namespaces)
    staged.dc = "west|east"
    staged.start = ctx.mark("wan", delay_ms=80, jitter_ms=40, loss=0.05)
    relayed = ctx.mesh.workdir / "proxy.jsonl"
    await asyncio.to_thread(net.latency, 80, 40, relayed)
    await asyncio.to_thread(net.loss, 0.05)
    await asyncio.sleep(8)
    dropped = await asyncio.to_thread(net.dropped)
    staged.heal = ctx.mark("heal", dropped=dropped)
    await asyncio.to_thread(net.clear)
    connections = len(relayed.read_text().splitlines()) if relayed.exists() else 0
    staged.notes.append(
        f"the delay proxy relayed {connections} connection(s); {dropped} packets were dropped"
    )
    if not connections:
        staged.failures.append("no connection went through the delay proxy: not exercised")


async def _sample_backlogs(ctx: Context) -> None:
    """Every ``SAMPLE_S``, each DC's backlog depth and oldest age (from etcd) and its idle
    slots (from an agent's view: active agents that are not suspect), into the history."""
    assert ctx.mesh.trust is not None
    reader = ctx.mesh.trust.user("chaos-monitor", roles=["reader"])
    clients = {a.address: MeshClient(a.address, reader) for a in ctx.mesh.agents.values()}
    try:
        while True:
            for dc in DCS:
                depth, oldest = await ctx.mesh.backlog(dc)
                idle = await _idle_slots(ctx, dc, clients)
                ctx.marks.write(
                    "sample", "backlog", dc=dc, depth=depth, oldest_s=round(oldest, 3), idle=idle
                )
            await asyncio.sleep(SAMPLE_S)
    finally:
        for client in clients.values():
            await client.close()


async def _idle_slots(ctx: Context, dc: str, clients: dict[str, MeshClient]) -> int | None:
    for agent in ctx.mesh.in_dc(dc):
        if not agent.alive():
            continue
        try:
            infos = await clients[agent.address].agents(timeout_s=1.0)
        except grpc.aio.AioRpcError:
            continue
        return sum(
            max(0, len(a.gpus) - a.running) for a in infos if a.state == "active" and not a.suspect
        )
    return None


async def burst(ctx: Context, staged: Staged) -> None:
    """Thousands of short tasks at high concurrency over both DCs (deep backlogs), an
    agent SIGKILLed once half of them are in, until both backlogs have drained."""
    count, concurrency = BURST_QUICK if ctx.quick else BURST_FULL
    sampling = asyncio.create_task(_sample_backlogs(ctx))
    try:
        before = ctx.load.accepted
        ctx.mark("flood", tasks=count, concurrency=concurrency)
        flooding = asyncio.create_task(ctx.load.flood(count, concurrency, BURST_TASK_S))

        async def half_in() -> bool:
            return ctx.load.accepted - before >= count // 2 or flooding.done()

        await _poll(half_in, 120)
        await agent_signal(ctx, staged, signal.SIGKILL, ctx.busiest())
        await flooding

        async def drained() -> bool:
            return all([(await ctx.mesh.backlog(dc))[0] == 0 for dc in DCS])

        if await _poll(drained, BURST_SETTLE_S) is None:
            staged.notes.append(f"the backlogs had not drained {BURST_SETTLE_S:g}s after")
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    staged.notes.append(f"flood of {count} tasks, {concurrency} Submits in flight at most")


SCENARIOS = [
    Scenario("agent-kill", "SIGKILL the busiest agent mid-task", agent_kill, agent_death,
             (DETECT, RERUN), quick=True, max_error_rate=CRASH_ERRORS),
    Scenario("agent-term", "SIGTERM the busiest agent: it drains and hands over", agent_term,
             handover, (HANDOVER,), max_error_rate=DRAIN_ERRORS),
    Scenario("agent-stop", "SIGSTOP the busiest agent past the TTL, then SIGCONT", agent_stop,
             agent_death, (DETECT, RERUN), max_error_rate=CRASH_ERRORS),
    Scenario("owner-kill", "SIGKILL west's queue owner", owner_kill, owner_death,
             (DETECT, RERUN, FAILOVER), quick=True, max_error_rate=CRASH_ERRORS),
    Scenario("owner-stop", "SIGSTOP west's queue owner past the TTL, then SIGCONT", owner_stop,
             owner_death, (DETECT, RERUN, FAILOVER), checks=fenced_on_waking),
    Scenario("etcd-leader-kill", "SIGKILL the leader of west's 3-member etcd",
             etcd_leader_kill, measured, quick=True, needs=("etcd-3.4",)),
    Scenario("etcd-quorum-loss", "SIGKILL 2 of west's 3 etcd members for 2 TTLs",
             etcd_quorum_loss, etcd_trouble, quick=True, needs=("etcd-3.4",),
             checks=outlived_etcd_outage),
    Scenario("dc-etcd-down", "SIGKILL east's only etcd member for 2 TTLs", dc_etcd_down,
             etcd_trouble, needs=("etcd-3.4",), checks=outlived_etcd_outage),
    Scenario("dc-partition", "cut west off from east (iptables in the WAN namespace)",
             dc_partition, measured, quick=True, needs=("netns",)),
    Scenario("wan-latency-loss", "80±40 ms between the DCs (delay proxy) and 5% loss",
             wan_latency_loss, measured, needs=("netns",)),
    Scenario("burst", "thousands of short tasks at once over both DCs, an agent SIGKILLed "
             "midway", burst, agent_death, (DETECT,), checks=backlog_kept_moving, quick=True,
             settle_s=BURST_SETTLE_S),
]  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}
