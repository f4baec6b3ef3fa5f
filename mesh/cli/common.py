"""What every ``meshctl`` command shares: the app, its options, the endpoint, output."""

from __future__ import annotations

import asyncio
import json
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
from rich.table import Table

from mesh.client import MeshClient
from mesh.core.task import state_name
from mesh.local import localmesh
from mesh.v1 import tasks_pb2 as pb

console = Console()
err = Console(stderr=True)

T = TypeVar("T")
# The repository's topology/local.yaml, wherever meshctl is run from (an editable install).
DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "topology" / "local.yaml"


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
