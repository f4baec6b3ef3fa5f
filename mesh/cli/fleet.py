"""The DC's agents, models and queue, and routing: ``meshctl agents``, ``models``,
``route``, ``replay``, ``queue`` and ``drain``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mesh.cli.common import (
    EndpointOpt,
    HomeOpt,
    Output,
    OutputOpt,
    Target,
    as_dict,
    call,
    console,
    emit,
    err,
    fail,
    local_operator,
    resolve_endpoint,
)
from mesh.client import MeshClient
from mesh.local import localmesh
from mesh.v1 import tasks_pb2 as pb

app = typer.Typer()


@app.command()
def agents(
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """The agents of the endpoint's DC, from etcd."""
    found = call(resolve_endpoint(endpoint, home), lambda c: c.agents())

    def table() -> Table:
        t = Table("agent", "dc", "address", "state", "gpus", "weight", "models loaded")
        for a in found:
            gpus = ", ".join(
                sorted(
                    {
                        f"{sum(g.gpu_class == c for g in a.gpus)}x{c}"
                        for c in {g.gpu_class for g in a.gpus}
                    }
                )
            )
            t.add_row(
                a.agent_id,
                a.dc,
                a.address,
                a.state,
                gpus,
                f"{a.weight:.2f}",
                ", ".join(a.models_loaded),
            )
        return t

    emit([as_dict(a) for a in found], output, table)


@app.command()
def models(
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """The models of the endpoint's DC: demand (GPU-seconds a second), where each is
    loaded, where the placement plan puts it, and the moves that follow (warm where
    planned, evictable elsewhere); and the demand for it in the other DCs, from their
    summaries."""

    async def both(client: MeshClient) -> tuple[list[pb.AgentInfo], pb.QueueResponse]:
        return await client.agents(), await client.queue()

    found, queue = call(resolve_endpoint(endpoint, home), both)
    rows = model_rows(found, list(queue.remote))

    def table() -> Table:
        t = Table("model", "GPU-s/s", "loaded on", "planned on", "warm", "evictable", "other DCs")
        for row in rows:
            elsewhere = row["other_dcs"]
            assert isinstance(elsewhere, dict)
            t.add_row(
                row["model"],
                f"{row['demand']:.2f}",
                *(", ".join(row[k]) for k in ("loaded", "planned", "warm", "evictable")),
                ", ".join(f"{dc} {v:.2f}" for dc, v in elsewhere.items()),
            )
        return t

    emit(rows, output, table)


def model_rows(
    agents: list[pb.AgentInfo], remote: Sequence[pb.RemoteDc] = ()
) -> list[dict[str, object]]:
    """One row per model an agent asks for, holds, or is planned to hold, or another DC
    asks for."""
    demand: dict[str, float] = {}
    loaded: dict[str, set[str]] = {}
    planned: dict[str, set[str]] = {}
    for a in agents:
        for model, rate in a.demand.items():
            demand[model] = demand.get(model, 0.0) + rate
        for model in a.models_loaded:
            loaded.setdefault(model, set()).add(a.agent_id)
        for model in a.models_planned:
            planned.setdefault(model, set()).add(a.agent_id)
    elsewhere: dict[str, dict[str, float]] = {}
    for dc in sorted(remote, key=lambda r: r.dc):
        for model, rate in dc.demand.items():
            elsewhere.setdefault(model, {})[dc.dc] = round(rate, 3)
    rows = []
    everything = {*demand, *loaded, *planned, *elsewhere}
    for model in sorted(everything, key=lambda m: (-demand.get(m, 0), m)):
        on, plan = loaded.get(model, set()), planned.get(model, set())
        rows.append(
            {
                "model": model,
                "demand": round(demand.get(model, 0.0), 3),
                "loaded": sorted(on),
                "planned": sorted(plan),
                "warm": sorted(plan - on),
                "evictable": sorted(on - plan),
                "other_dcs": elsewhere.get(model, {}),
            }
        )
    return rows


def _endpoint_in(dc: str, home: Path) -> Target:
    agents = [s for s in localmesh.read_state(home) if s.kind == "agent" and s.dc == dc]
    if not agents:
        raise fail(f"no agent of DC {dc!r} in the local mesh; give --endpoint", 2)
    return Target(agents[0].peer_address, local_operator(home))


def _targets_table(reply: pb.RouteResponse) -> Table:
    targets = Table(
        "#",
        "kind",
        "target",
        "max tasks",
        "reason",
        title=f"{reply.agent_id} ({reply.dc}), bound {reply.bound:.3f}/weight; "
        f"{reply.quota or 'within quota'}",
    )
    for n, t in enumerate(reply.targets, 1):
        limit = f"{t.max_tasks:.2f}" if t.max_tasks else "hard limit"
        targets.add_row(str(n), t.kind, t.name or "-", limit, t.reason)
    return targets


def _candidates_table(reply: pb.RouteResponse) -> Table:
    ring = Table(
        "agent",
        "tasks",
        "may hold",
        "eligible",
        "model loaded",
        "verdict",
        title="candidates in ring order",
    )
    for c in reply.candidates:
        ring.add_row(
            c.agent_id,
            str(c.tasks),
            f"{c.max_tasks:.2f}",
            "yes" if c.eligible else "no",
            "yes" if c.model_loaded else "",
            c.verdict,
        )
    return ring


@app.command()
def route(
    model: Annotated[str, typer.Option(help="model name")],
    pipeline: Annotated[str, typer.Option(help="pipeline name")],
    affinity: Annotated[str, typer.Option(help="affinity key")] = "",
    gpus: Annotated[int, typer.Option(help="GPU count")] = 1,
    min_memory: Annotated[int, typer.Option(help="minimum GPU memory, MB")] = 0,
    dc: Annotated[str, typer.Option(help="ask an agent of this local DC")] = "",
    explain: Annotated[bool, typer.Option(help="list the candidates in ring order")] = False,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """What an agent would decide for such a task now, and why."""
    spec = pb.TaskSpec(
        task_id="route-probe",
        model=model,
        pipeline=pipeline,
        affinity_key=affinity,
        gpu_count=gpus,
        min_gpu_memory_mb=min_memory,
    )
    target = _endpoint_in(dc, home) if dc and not endpoint else resolve_endpoint(endpoint, home)
    reply = call(target, lambda c: c.route(spec, explain))

    def tables() -> Table:
        targets = _targets_table(reply)
        if not reply.candidates:
            return targets
        console.print(targets)
        return _candidates_table(reply)

    emit(as_dict(reply), output, tables)


@app.command()
def replay(log: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Route every decision of a decision log again, offline; exit 1 on any difference."""
    from mesh.agent.decisionlog import replay as replay_log

    total, differ = 0, []
    for replayed in replay_log(log):
        total += 1
        if not replayed.same:
            differ.append(replayed)
    for d in differ[:10]:
        logged, now = d.logged.get("targets", d.logged), d.now.get("targets", d.now)
        err.print(f"line {d.line} ({d.task_id}): logged {logged} now {now}")
    console.print(
        f"{total} decisions replayed, {total - len(differ)} identical, {len(differ)} different"
    )
    if differ:
        raise typer.Exit(1)


@app.command()
def queue(
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """The endpoint DC's queue owner, its term, and its backlog per class."""
    reply = call(resolve_endpoint(endpoint, home), lambda c: c.queue())

    def table() -> Table:
        owner = reply.owner or "none elected"
        rows = Table(
            "class",
            "waiting",
            "oldest wait s",
            title=f"{reply.dc}: owner {owner}, term {reply.term}",
        )
        for c in reply.classes:
            rows.add_row(c.name, str(c.depth), f"{c.oldest_wait_s:.1f}")
        return rows

    emit(as_dict(reply), output, table)


@app.command()
def drain(
    agent: Annotated[str, typer.Argument(help="agent id")],
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Mark AGENT draining: no new tasks; its running and queued ones finish."""
    _drain(agent, endpoint, output, home, lambda c: c.drain())


@app.command()
def undrain(
    agent: Annotated[str, typer.Argument(help="agent id")],
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Take a drained AGENT back into service."""
    _drain(agent, endpoint, output, home, lambda c: c.undrain())


def _drain(
    agent: str,
    endpoint: str | None,
    output: Output,
    home: Path,
    change: Callable[[MeshClient], Awaitable[pb.AgentInfo]],
) -> None:
    where = resolve_endpoint(endpoint, home)
    infos = call(where, lambda c: c.agents())
    target = next((i for i in infos if i.agent_id == agent), None)
    if target is None:
        raise fail(f"no agent {agent!r} in that DC; see 'meshctl agents'")
    info = call(where.at(target), change)
    emit(
        as_dict(info),
        output,
        lambda: Table("agent", "state", title=f"{info.agent_id}: {info.state}"),
    )
