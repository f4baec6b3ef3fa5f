"""What every ``meshctl`` command shares: the app, its options, the endpoint, output."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar

import grpc
import typer
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from mesh.channels import Security
from mesh.client import MeshClient
from mesh.core.task import state_name
from mesh.errors import ConfigError
from mesh.local import localmesh
from mesh.local.trust import LocalTrust
from mesh.v1 import tasks_pb2 as pb


def _width(stream: TextIO) -> int | None:
    """The terminal's width; piped or logged, ``COLUMNS`` or no limit to speak of, so a
    table is never cut to 80 columns in a CI log."""
    if stream.isatty() or os.environ.get("COLUMNS"):
        return None  # rich asks the terminal, or reads COLUMNS
    return 1000


console = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))

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
TopologyOpt = Annotated[
    Path, typer.Option("--topology", help="topology file: the mesh's DCs and their etcd")
]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@dataclass
class Credentials:
    """The caller's credentials, from the global options (``meshctl --token ... list``)
    or their ``MESH_*`` twins. None given: the local mesh's operator certificate."""

    token: str | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    mesh: str = localmesh.MESH
    insecure: bool = False

    @property
    def given(self) -> bool:
        return bool(self.token or self.cert or self.ca or self.insecure)

    def security(self) -> Security:
        if self.insecure:
            return Security(self.mesh, insecure=True)
        try:
            return Security.from_files(self.mesh, self.ca, self.cert, self.key, self.token)
        except ConfigError as exc:
            raise fail(f"{exc.message} (--ca, --cert/--key or --token)", 2) from None


CREDENTIALS = Credentials()


@dataclass(frozen=True, slots=True)
class Target:
    """An agent to call, and how."""

    address: str
    security: Security

    def at(self, info: pb.AgentInfo) -> Target:
        """The same caller, at another agent: its mTLS port with a certificate, else its
        API port."""
        mtls = self.security.cert is not None or self.security.insecure
        return Target(info.mtls_address if mtls else info.address, self.security)


def resolve_endpoint(endpoint: str | None, home: Path) -> Target:
    """``--endpoint`` with the given credentials; else the local mesh's first agent, with
    its operator certificate, found under ``home``. An ``--endpoint`` that is an agent of
    the local mesh, with no credentials given, is reached as the local mesh's operator."""
    agents = [s for s in localmesh.read_state(home) if s.kind == "agent"]
    if endpoint:
        local = [a for a in agents if endpoint in (a.address, a.peer_address)]
        if local and not CREDENTIALS.given:
            return Target(local[0].peer_address, local_operator(home))
        return Target(endpoint, CREDENTIALS.security())
    if not agents:
        raise fail("no endpoint: give --endpoint, set MESH_ENDPOINT, or run 'meshctl up'", 2)
    if CREDENTIALS.given:
        security = CREDENTIALS.security()
        return Target(agents[0].peer_address if security.cert else agents[0].address, security)
    return Target(agents[0].peer_address, local_operator(home))


def local_operator(home: Path) -> Security:
    try:
        return LocalTrust(home / "pki", CREDENTIALS.mesh).operator()
    except ConfigError as exc:
        raise fail(f"no credentials of the local mesh: {exc.message}", 2) from None


def etcd_security(home: Path) -> Security:
    """Who ``meshctl`` is to etcd: the given certificate (its CN an etcd user, e.g. the
    operator), else the local mesh's operator."""
    return CREDENTIALS.security() if CREDENTIALS.given else local_operator(home)


def call(target: Target, work: Callable[[MeshClient], Awaitable[T]]) -> T:
    """Run one client interaction, turning gRPC errors into a one-line message."""

    async def run() -> T:
        async with MeshClient(target.address, target.security) as client:
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


def waiting(status: pb.TaskStatus, now_ms: int) -> str:
    """Why a queued task waits and when it should start, as its record says."""
    if status.state != pb.TASK_STATE_QUEUED:
        return ""
    why = status.progress.message
    if status.HasField("expected_start"):
        in_s = max(0.0, (status.expected_start.ToMilliseconds() - now_ms) / 1000)
        return f"{why}; " * bool(why) + f"expected to start in {in_s:.0f}s"
    return why


def status_table(statuses: list[pb.TaskStatus]) -> Table:
    table = Table("task", "state", "dc", "agent", "attempt", "progress", "model", "queue", "note")
    now = int(time.time() * 1000)
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
            s.error.message[:60] or waiting(s, now),
        )
    return table


# -- local mesh ------------------------------------------------------------------------------
