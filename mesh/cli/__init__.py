"""``meshctl``: run a local mesh, submit and follow tasks, look at agents.

The endpoint is ``--endpoint``, else ``MESH_ENDPOINT``, else the first agent of the local
mesh that ``meshctl up`` started (or the one ``--endpoint`` names), reached with the local
mesh's operator certificate. For any other mesh, give credentials before or after the
command: ``--ca`` with ``--token`` (an agent's API port) or ``--cert``/``--key`` (its mTLS
port), or their ``MESH_*`` twins.
Every command prints a table by default, or ``-o json`` / ``-o yaml`` for scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

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


CREDENTIAL_OPTIONS = {"--token", "--cert", "--key", "--ca", "--mesh"}  # each takes a value
CREDENTIAL_FLAGS = {"--insecure"}


def lift_credentials(group: Any, args: Sequence[str]) -> list[str]:
    """``args`` with the credential options given after the command moved before it, where
    the app reads them (``meshctl queue --ca X`` as ``meshctl --ca X queue``). Options the
    command itself defines (``pki issue --mesh``) stay where they are."""
    args = list(args)
    command = group  # typer's own click: a group is what has commands
    i = 0
    while i < len(args) and hasattr(command, "commands"):
        name, _, _ = args[i].partition("=")
        if name in CREDENTIAL_OPTIONS and "=" not in args[i]:
            i += 2
        elif args[i].startswith("-"):
            i += 1
        elif (sub := command.commands.get(args[i])) is not None:
            command, i = sub, i + 1
        else:
            return args  # not a command: click will say so
    own = {opt for param in command.params for opt in param.opts}
    lifted: list[str] = []
    rest = args[:i]
    while i < len(args):
        name, _, _ = args[i].partition("=")
        if args[i] == "--":
            rest += args[i:]
            break
        takes_value = name in CREDENTIAL_OPTIONS and "=" not in args[i]
        if name in (CREDENTIAL_OPTIONS | CREDENTIAL_FLAGS) - own:
            lifted += args[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            rest.append(args[i])
            i += 1
    return lifted + rest


def main() -> None:
    """``meshctl``: the app, with credentials accepted on either side of the command."""
    command = typer.main.get_command(app)
    command(lift_credentials(command, sys.argv[1:]), prog_name="meshctl")
