"""Topologies: ``meshctl topology validate``, ``schema``, ``show``, ``diff`` and ``apply``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from mesh.cli.common import DEFAULT_TOPOLOGY, HomeOpt, console, etcd_security, fail
from mesh.errors import ConfigError
from mesh.local import localmesh
from mesh.topology import load as load_topology

app = typer.Typer(no_args_is_help=True, help="Validate, compare and apply topologies.")
TopologyArg = Annotated[Path, typer.Argument(help="topology file")]


def _load(path: Path) -> Any:
    try:
        return load_topology(path)
    except ConfigError as exc:
        raise fail(exc.message) from None


def _as_yaml(topology: Any) -> str:
    return yaml.safe_dump(json.loads(topology.to_json()), sort_keys=True)


@app.command("validate")
def topology_validate(file: TopologyArg) -> None:
    """Check a topology file; one line per problem."""
    topology = _load(file)
    console.print(f"{file}: valid ({len(topology.dcs)} DCs: {', '.join(topology.dcs)})")


@app.command("schema")
def topology_schema() -> None:
    """The topology file's JSON Schema (what topology/schema.json holds)."""
    from mesh.topology import schema

    print(json.dumps(schema(), indent=2))


@app.command("show")
def topology_show(
    file: Annotated[Path, typer.Argument(help="file naming the DCs")] = DEFAULT_TOPOLOGY,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """What each DC's etcd holds (the DCs and etcd endpoints come from FILE)."""
    from mesh.store import topostore

    states = asyncio.run(topostore.read_all(_load(file), etcd_security(home)))
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


@app.command("diff")
def topology_diff(file: TopologyArg, home: HomeOpt = localmesh.DEFAULT_HOME) -> None:
    """How FILE differs from what is applied (exit 1 if it does)."""
    import difflib

    from mesh.store import topostore

    topology = _load(file)
    changed = False
    for s in asyncio.run(topostore.read_all(topology, etcd_security(home))):
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


@app.command("apply")
def topology_apply(file: TopologyArg, home: HomeOpt = localmesh.DEFAULT_HOME) -> None:
    """Write FILE to every DC's etcd as a new version; agents switch without restart."""
    from mesh.store import topostore

    report = asyncio.run(topostore.apply(_load(file), etcd_security(home)))
    table = Table("dc", "result")
    for dc, what in report.items():
        table.add_row(dc, what)
    console.print(table)
    if any(not w.startswith(("applied", "unchanged")) for w in report.values()):
        raise typer.Exit(1)
