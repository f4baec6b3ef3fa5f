"""``meshctl``: run a local mesh, submit and follow tasks, look at agents.

The endpoint is ``--endpoint``, else ``MESH_ENDPOINT``, else the first agent of the local
mesh that ``meshctl up`` started, reached with the local mesh's operator certificate. For
any other mesh, give credentials before the command: ``--ca`` with ``--token`` (an
agent's API port) or ``--cert``/``--key`` (its mTLS port), or their ``MESH_*`` twins.
Every command prints a table by default, or ``-o json`` / ``-o yaml`` for scripts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mesh.cli import fleet, local, pki, quota, tasks, topology, trace
from mesh.cli.common import CREDENTIALS
from mesh.local.localmesh import MESH

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.callback()
def credentials(
    token: Annotated[
        str | None, typer.Option(envvar="MESH_TOKEN", help="bearer token (API port)")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(envvar="MESH_CERT", help="client certificate (mTLS port)")
    ] = None,
    key: Annotated[Path | None, typer.Option(envvar="MESH_KEY", help="its private key")] = None,
    ca: Annotated[Path | None, typer.Option(envvar="MESH_CA", help="the mesh's CA")] = None,
    mesh: Annotated[str, typer.Option(envvar="MESH_NAME", help="the mesh's name")] = MESH,
    insecure: Annotated[
        bool, typer.Option(help="plaintext, for a mesh run with --insecure only")
    ] = False,
) -> None:
    """Credentials for every command; without any, the local mesh's operator's."""
    CREDENTIALS.token, CREDENTIALS.cert, CREDENTIALS.key, CREDENTIALS.ca = token, cert, key, ca
    CREDENTIALS.mesh, CREDENTIALS.insecure = mesh, insecure


for group in (local, tasks, fleet, pki, trace):  # their commands at the top level
    app.add_typer(group.app)
app.add_typer(topology.app, name="topology")
app.add_typer(quota.app, name="quota")
