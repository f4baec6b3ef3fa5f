"""``meshctl``: run a local mesh, submit and follow tasks, look at agents.

The endpoint is ``--endpoint``, else ``MESH_ENDPOINT``, else the first agent of the local
mesh that ``meshctl up`` started. Every command prints a table by default, or ``-o json``
/ ``-o yaml`` for scripts.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from mesh.client import MeshClient
from mesh.core.task import state_name
from mesh.errors import ConfigError, MeshError
from mesh.local import localmesh
from mesh.topology import load as load_topology
from mesh.v1 import tasks_pb2 as pb

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()
err = Console(stderr=True)

T = TypeVar("T")
# The repository's topology/local.yaml, wherever meshctl is run from (an editable install).
DEFAULT_TOPOLOGY = Path(__file__).resolve().parent.parent / "topology" / "local.yaml"


class Output(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


EndpointOpt = Annotated[
    str | None,
    typer.Option("--endpoint", "-e", envvar="MESH_ENDPOINT", help="host:port of any agent"),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table, json or yaml")]
HomeOpt = Annotated[
    Path, typer.Option("--home", envvar="MESH_HOME", help="state folder of the local mesh")
]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def resolve_endpoint(endpoint: str | None, home: Path) -> str:
    if endpoint:
        return endpoint
    agents = [s for s in localmesh.read_state(home) if s.kind == "agent"]
    if not agents:
        raise fail("no endpoint: give --endpoint, set MESH_ENDPOINT, or run 'meshctl up'", 2)
    return agents[0].address


def call(endpoint: str, work: Callable[[MeshClient], Awaitable[T]]) -> T:
    """Run one client interaction, turning gRPC errors into a one-line message."""

    async def run() -> T:
        async with MeshClient(endpoint) as client:
            return await work(client)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise fail(f"{exc.code().name}: {exc.details()}") from None


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def emit(data: Any, output: Output, table: Callable[[], Table]) -> None:
    if output is Output.json:
        print(json.dumps(data, indent=2))
    elif output is Output.yaml:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    else:
        console.print(table())


def status_table(statuses: list[pb.TaskStatus]) -> Table:
    table = Table("task", "state", "dc", "agent", "attempt", "progress", "model", "queue", "error")
    for s in statuses:
        progress = f"{s.progress.step}/{s.progress.total}" if s.progress.total else ""
        table.add_row(
            s.task_id,
            state_name(s.state),
            s.dc,
            s.agent,
            str(s.attempt),
            progress,
            s.spec.model,
            s.spec.queue,
            s.error.message[:60],
        )
    return table


# -- local mesh ------------------------------------------------------------------------------


@app.command()
def up(
    topology: Annotated[Path, typer.Option(help="topology file")] = DEFAULT_TOPOLOGY,
    detach: Annotated[bool, typer.Option(help="return once up; stop with 'meshctl down'")] = False,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Start a local mesh: one etcd per DC and the topology's agents, on 127.0.0.1."""
    try:
        mesh = localmesh.LocalMesh(load_topology(topology), home)
        with console.status("starting etcd and agents"):
            started = mesh.up()
    except MeshError as exc:
        raise fail(str(exc)) from None
    table = Table("kind", "name", "dc", "address", "pid")
    for s in started:
        table.add_row(s.kind, s.name, s.dc, s.address, str(s.pid))
    console.print(table)
    if detach:
        console.print(f"state in {home}; stop with [bold]meshctl down[/bold]")
        return
    console.print("local mesh up; Ctrl-C to stop")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        with console.status("stopping"):
            mesh.down()


@app.command()
def down(home: HomeOpt = localmesh.DEFAULT_HOME) -> None:
    """Stop the local mesh that 'meshctl up --detach' started."""
    stopped = localmesh.stop(home)
    console.print(f"stopped {len(stopped)} process(es)" if stopped else "nothing was running")


# -- agents and tasks -----------------------------------------------------------------------


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


def parse_params(params: list[str]) -> dict[str, str]:
    out = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--param {item!r}: expected KEY=VALUE", 2)
        out[key] = value
    return out


@app.command()
def submit(
    pipeline: Annotated[str, typer.Option(help="pipeline, e.g. sleep, echo, command")],
    model: Annotated[str, typer.Option(help="model name")],
    task_type: Annotated[
        str, typer.Option("--type", help="t2i, i2i, super_resolution, tts, llm or custom")
    ] = "custom",
    user: Annotated[str, typer.Option(help="user id")] = "cli",
    queue: Annotated[str, typer.Option(help="queue class; empty: the default")] = "",
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE")] = [],  # noqa: B006
    payload_file: Annotated[
        Path | None, typer.Option("--payload", exists=True, dir_okay=False, help="file to send")
    ] = None,
    task_id: Annotated[str, typer.Option("--id", help="client id (idempotent)")] = "",
    timeout: Annotated[float, typer.Option(help="task deadline in seconds; 0: default")] = 0,
    affinity: Annotated[str, typer.Option(help="affinity key")] = "",
    gpus: Annotated[int, typer.Option(help="GPU count")] = 1,
    wait: Annotated[bool, typer.Option(help="follow the task to its end")] = False,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Submit a task to any agent."""
    try:
        kind = pb.TaskType.Value(f"TASK_TYPE_{task_type.upper()}")
    except ValueError:
        raise fail(f"unknown --type {task_type!r}", 2) from None
    spec = pb.TaskSpec(
        task_id=task_id,
        user=pb.User(id=user),
        task_type=kind,
        pipeline=pipeline,
        model=model,
        queue=queue,
        params=parse_params(param),
        affinity_key=affinity,
        gpu_count=gpus,
        payload=payload_file.read_bytes() if payload_file else b"",
    )
    if timeout:
        spec.timeout.FromMilliseconds(int(timeout * 1000))
    address = resolve_endpoint(endpoint, home)
    reply = call(address, lambda c: c.submit(spec))
    if wait:
        follow(address, reply.status.task_id, output)
        return
    emit(as_dict(reply), output, lambda: status_table([reply.status]))


@app.command()
def get(
    task_id: str,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """A task's status, from any agent of its DC."""
    status = call(resolve_endpoint(endpoint, home), lambda c: c.get(task_id))
    emit(as_dict(status), output, lambda: status_table([status]))


@app.command("list")
def list_tasks(
    user: Annotated[str, typer.Option(help="only this user's tasks")] = "",
    state: Annotated[str, typer.Option(help="only tasks in this state")] = "",
    limit: Annotated[int, typer.Option(help="most tasks to show")] = 50,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Tasks of the endpoint's DC."""
    try:
        state_value = pb.TaskState.Value(f"TASK_STATE_{state.upper()}") if state else 0
    except ValueError:
        raise fail(f"unknown --state {state!r}", 2) from None
    reply = call(
        resolve_endpoint(endpoint, home),
        lambda c: c.list(user_id=user, state=state_value, limit=limit),
    )
    emit(as_dict(reply), output, lambda: status_table(list(reply.tasks)))


def follow(address: str, task_id: str, output: Output) -> None:
    async def run(client: MeshClient) -> pb.TaskStatus:
        last = None
        if output is not Output.table:
            async for event in client.watch(task_id):
                print(json.dumps(as_dict(event)), flush=True)
                last = event.status
            assert last is not None
            return last
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            console=console,
        ) as bar:
            row = bar.add_task(task_id, total=None)
            async for event in client.watch(task_id):
                last = event.status
                p = last.progress
                bar.update(
                    row,
                    description=f"{task_id} {state_name(last.state)} {last.agent}",
                    completed=p.step,
                    total=p.total or None,
                )
        assert last is not None
        return last

    status = call(address, run)
    if output is Output.table:
        console.print(status_table([status]))
    if status.state != pb.TASK_STATE_SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def watch(
    task_id: str,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Follow a task with a progress bar until it ends (exit 1 unless it succeeded)."""
    follow(resolve_endpoint(endpoint, home), task_id, output)


@app.command()
def cancel(
    task_id: str,
    reason: Annotated[str, typer.Option(help="recorded with the task")] = "",
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Cancel a task, from any agent of its DC."""
    status = call(resolve_endpoint(endpoint, home), lambda c: c.cancel(task_id, reason))
    emit(as_dict(status), output, lambda: status_table([status]))


# -- routing ---------------------------------------------------------------------------------


def _endpoint_in(dc: str, home: Path) -> str:
    agents = [s for s in localmesh.read_state(home) if s.kind == "agent" and s.dc == dc]
    if not agents:
        raise fail(f"no agent of DC {dc!r} in the local mesh; give --endpoint", 2)
    return agents[0].address


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
    address = endpoint or (_endpoint_in(dc, home) if dc else resolve_endpoint(None, home))
    reply = call(address, lambda c: c.route(spec, explain))

    def tables() -> Table:
        targets = Table(
            "#",
            "kind",
            "target",
            "max tasks",
            "reason",
            title=f"{reply.agent_id} ({reply.dc}), bound {reply.bound:.3f}/weight",
        )
        for n, t in enumerate(reply.targets, 1):
            limit = f"{t.max_tasks:.2f}" if t.max_tasks else "hard limit"
            targets.add_row(str(n), t.kind, t.name or "-", limit, t.reason)
        if not reply.candidates:
            return targets
        console.print(targets)
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
        err.print(
            f"line {d.line} ({d.task_id}): logged {d.logged['targets'][:1]} "
            f"now {d.now['targets'][:1]}"
        )
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
    infos = call(resolve_endpoint(endpoint, home), lambda c: c.agents())
    target = next((i for i in infos if i.agent_id == agent), None)
    if target is None:
        raise fail(f"no agent {agent!r} in that DC; see 'meshctl agents'")
    info = call(target.address, lambda c: c.drain())
    emit(
        as_dict(info),
        output,
        lambda: Table("agent", "state", title=f"{info.agent_id}: {info.state}"),
    )


topology_app = typer.Typer(no_args_is_help=True, help="Validate, compare and apply topologies.")
app.add_typer(topology_app, name="topology")
TopologyArg = Annotated[Path, typer.Argument(help="topology file")]


def _load(path: Path) -> Any:
    try:
        return load_topology(path)
    except ConfigError as exc:
        raise fail(exc.message) from None


def _as_yaml(topology: Any) -> str:
    return yaml.safe_dump(json.loads(topology.to_json()), sort_keys=True)


@topology_app.command("validate")
def topology_validate(file: TopologyArg) -> None:
    """Check a topology file; one line per problem."""
    topology = _load(file)
    console.print(f"{file}: valid ({len(topology.dcs)} DCs: {', '.join(topology.dcs)})")


@topology_app.command("schema")
def topology_schema() -> None:
    """The topology file's JSON Schema (what topology/schema.json holds)."""
    from mesh.topology import schema

    print(json.dumps(schema(), indent=2))


@topology_app.command("show")
def topology_show(
    file: Annotated[Path, typer.Argument(help="file naming the DCs")] = DEFAULT_TOPOLOGY,
) -> None:
    """What each DC's etcd holds (the DCs and etcd endpoints come from FILE)."""
    from mesh.store import topostore

    states = asyncio.run(topostore.read_all(_load(file)))
    table = Table("dc", "version", "digest", "note")
    for s in states:
        version = f"v{s.applied.version}" if s.applied else "-"
        table.add_row(
            s.dc,
            version,
            s.applied.digest if s.applied else "-",
            s.error or ("" if s.applied else "never applied"),
        )
    console.print(table)
    first = next((s.applied for s in states if s.applied), None)
    if first is not None:
        print(_as_yaml(first.topology), end="")


@topology_app.command("diff")
def topology_diff(file: TopologyArg) -> None:
    """How FILE differs from what is applied (exit 1 if it does)."""
    import difflib

    from mesh.store import topostore

    topology = _load(file)
    changed = False
    for s in asyncio.run(topostore.read_all(topology)):
        if s.error:
            raise fail(f"{s.dc}: {s.error}")
        before = _as_yaml(s.applied.topology) if s.applied else ""
        lines = list(
            difflib.unified_diff(
                before.splitlines(),
                _as_yaml(topology).splitlines(),
                f"{s.dc} (applied)",
                str(file),
                lineterm="",
            )
        )
        changed |= bool(lines)
        console.print(f"[bold]{s.dc}[/bold]: " + ("differs" if lines else "same"))
        for line in lines:
            print(line)
    if changed:
        raise typer.Exit(1)


@topology_app.command("apply")
def topology_apply(file: TopologyArg) -> None:
    """Write FILE to every DC's etcd as a new version; agents switch without restart."""
    from mesh.store import topostore

    report = asyncio.run(topostore.apply(_load(file)))
    table = Table("dc", "result")
    for dc, what in report.items():
        table.add_row(dc, what)
    console.print(table)
    if any(not w.startswith(("applied", "unchanged")) for w in report.values()):
        raise typer.Exit(1)


@app.command()
def demo(
    topology: Annotated[Path, typer.Option(help="topology file")] = DEFAULT_TOPOLOGY,
    tasks: Annotated[int, typer.Option(help="tasks to submit", min=1)] = 240,
    seed: Annotated[int, typer.Option(help="workload seed")] = 7,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """The main job: a local 2-DC mesh, a mixed workload, a report; exit 1 if a task is lost."""
    from mesh.local.demo import run_demo

    try:
        mesh = localmesh.LocalMesh(load_topology(topology), home)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    started = time.monotonic()
    try:
        with console.status("starting a local mesh (etcd per DC, agents)"):
            mesh.up()
        lost = run_demo(mesh, tasks, seed, console)
    except MeshError as exc:
        raise fail(str(exc)) from None
    finally:
        with console.status("tearing down"):
            mesh.down()
    console.print(f"demo took {time.monotonic() - started:.1f}s")
    if lost:
        raise fail(f"{lost} task(s) lost")
    console.print("[green]every task reached a terminal state[/green]")


if __name__ == "__main__":
    app()
