"""``meshctl``: run a local mesh, submit and follow tasks, look at agents.

The endpoint is ``--endpoint``, else ``MESH_ENDPOINT``, else the first agent of the local
mesh that ``meshctl up`` started. Every command prints a table by default, or ``-o json``
/ ``-o yaml`` for scripts.
"""

from __future__ import annotations

import typer

from mesh.cli import fleet, local, tasks, topology

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
for group in (local, tasks, fleet):  # their commands at the top level
    app.add_typer(group.app)
app.add_typer(topology.app, name="topology")
