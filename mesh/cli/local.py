"""The local mesh: ``meshctl up``, ``down`` and ``demo``."""

from __future__ import annotations

import signal
import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from mesh.cli.common import (
    DEFAULT_TOPOLOGY,
    HomeOpt,
    TopologyOpt,
    console,
    fail,
)
from mesh.errors import ConfigError, MeshError
from mesh.local import localmesh
from mesh.topology import load as load_topology

app = typer.Typer()


@app.command()
def up(
    topology: TopologyOpt = DEFAULT_TOPOLOGY,
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
    console.print(f"console: {mesh.console_url()}", soft_wrap=True)  # one line, to copy
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
def demo(
    topology: TopologyOpt = DEFAULT_TOPOLOGY,
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
        console.print(f"console (while the demo runs): {mesh.console_url()}", soft_wrap=True)
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
