"""The mesh's trust material: ``meshctl pki init|issue`` and ``meshctl token issue|publish|
rotate|retire``.

``pki init`` makes a CA (and the operator's certificate, etcd's root certificate, a token
signing key and a gossip key) in a 0700 folder; ``pki issue`` signs agent, user and etcd
certificates with it. Tokens are signed with the folder's token key; ``token publish``
puts its public half in every DC's etcd, where agents check tokens against it. The local
mesh's folder (``~/.gpumesh/local/pki``) is the default, so on it these need no flag.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from pathlib import Path
from typing import Annotated

import typer

from mesh.cli.common import DEFAULT_TOPOLOGY, HomeOpt, TopologyOpt, console, etcd_security, fail
from mesh.errors import ConfigError
from mesh.local import localmesh
from mesh.local.trust import LocalTrust
from mesh.store.etcd import ETCD_ERRORS, client_for
from mesh.store.topostore import token_keys
from mesh.topology import load as load_topology
from mesh.trust.pki import Authority, write_pair, write_secret
from mesh.trust.tokens import SigningKey

app = typer.Typer()
pki_app = typer.Typer(no_args_is_help=True, help="The mesh's CA and the certificates it signs.")
token_app = typer.Typer(no_args_is_help=True, help="Bearer tokens signed by the mesh.")
app.add_typer(pki_app, name="pki")
app.add_typer(token_app, name="token")

DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", envvar="MESH_PKI", help="the CA's folder; default: the local mesh's"),
]
MeshOpt = Annotated[str, typer.Option("--mesh", envvar="MESH_NAME", help="the mesh's name")]
DURATION = re.compile(r"(\d+)([smhd])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _folder(directory: Path | None, home: Path) -> Path:
    return directory if directory is not None else home / "pki"


def _trust(directory: Path | None, home: Path, mesh: str) -> LocalTrust:
    try:
        return LocalTrust(_folder(directory, home), mesh)
    except (ConfigError, OSError) as exc:
        raise fail(f"no CA there ('meshctl pki init' makes one): {exc}", 2) from None


def duration(text: str) -> datetime.timedelta:
    match = DURATION.fullmatch(text)
    if not match:
        raise fail(f"{text!r}: a duration is a number and s, m, h or d (e.g. 30d)", 2)
    try:
        return datetime.timedelta(**{UNITS[match[2]]: int(match[1])})
    except OverflowError:
        raise fail(f"{text!r} is longer than any token may live", 2) from None


@pki_app.command("init")
def pki_init(
    mesh: MeshOpt = localmesh.MESH,
    directory: DirOpt = None,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Make a CA for a mesh, with the operator's certificate, a token key and a gossip key."""
    folder = _folder(directory, home)
    if (folder / "ca.crt").exists():
        raise fail(f"{folder} already holds a CA; it is not replaced", 2)
    LocalTrust.create(folder, mesh)
    console.print(f"CA of mesh {mesh!r} in {folder} (keys 0600, folder 0700)")


@pki_app.command("issue")
def pki_issue(
    kind: Annotated[str, typer.Argument(help="agent, user or etcd")],
    name: Annotated[str, typer.Option(help="agent id, user name or etcd member name")],
    dc: Annotated[str, typer.Option(help="the agent's DC")] = "",
    host: Annotated[list[str], typer.Option(help="DNS name or IP it serves on")] = [],  # noqa: B006
    group: Annotated[list[str], typer.Option(help="a user's group")] = [],  # noqa: B006
    role: Annotated[list[str], typer.Option(help="a user's role")] = [],  # noqa: B006
    days: Annotated[int, typer.Option(help="validity", min=1)] = 365,
    out: Annotated[Path | None, typer.Option(help="folder to write NAME.crt/.key in")] = None,
    mesh: MeshOpt = localmesh.MESH,
    directory: DirOpt = None,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Issue a certificate signed by the mesh's CA."""
    folder = _folder(directory, home)
    try:
        ca = Authority.load(mesh, folder)
        if kind == "agent":
            if not dc:
                raise fail("an agent certificate needs --dc", 2)
            pem = ca.issue_agent(name, dc, host, days)
        elif kind == "user":
            pem = ca.issue_user(name, group, role, days)
        elif kind == "etcd":
            pem = ca.issue_etcd(name, host, days)
        else:
            raise fail(f"unknown kind {kind!r}: agent, user or etcd", 2)
    except ConfigError as exc:
        raise fail(exc.message, 2) from None
    key, cert = write_pair(out or folder / f"{kind}s", name, pem)
    console.print(f"{cert}\n{key}")


@pki_app.command("secure-etcd")
def pki_secure_etcd(
    endpoints: Annotated[str, typer.Option(help="comma-separated host:port of one DC's etcd")],
    dc: Annotated[list[str], typer.Option(help="a DC whose agents use this etcd")],
    prefix: Annotated[str, typer.Option(help="the mesh's etcd key root")] = "gpumesh",
    mesh: MeshOpt = localmesh.MESH,
    directory: DirOpt = None,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Switch on one DC's etcd authorization (idempotent): each DC's agents confined to
    their keys, the operator to the topology, and the token key published. Needs the
    CA's folder (etcd's root certificate is in it)."""
    trust = _trust(directory, home, mesh)
    try:
        trust.secure_etcd_now([e for e in endpoints.split(",") if e], prefix, dc)
    except ETCD_ERRORS as exc:
        raise fail(f"etcd at {endpoints}: {exc}") from None
    console.print(f"etcd at {endpoints}: authorization on for {', '.join(dc)} under /{prefix}/")


@token_app.command("issue")
def token_issue(
    user: Annotated[str, typer.Option(help="the token's user")],
    groups: Annotated[str, typer.Option(help="comma-separated groups")] = "",
    role: Annotated[list[str], typer.Option(help="submitter, reader or operator")] = [],  # noqa: B006
    ttl: Annotated[str, typer.Option(help="validity, e.g. 30d, 12h")] = "1d",
    mesh: MeshOpt = localmesh.MESH,
    directory: DirOpt = None,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Print a token signed with the mesh's token key (on stdout, nothing else)."""
    trust = _trust(directory, home, mesh)
    names = [g for g in groups.split(",") if g]
    try:
        print(trust.token(user, names, role or ["submitter"], duration(ttl)))
    except ConfigError as exc:
        raise fail(exc.message, 2) from None


async def _publish(
    topology_file: Path, home: Path, change: str, kid: str, public: bytes = b""
) -> None:
    topology = load_topology(topology_file)
    security = etcd_security(home)
    for name, dc in topology.dcs.items():
        key = token_keys(topology.prefix) + kid.encode()
        try:
            async with client_for(dc.etcd, security=security) as client:
                if change == "put":
                    await client.put(key, public)
                else:
                    await client.delete(key)
        except ETCD_ERRORS as exc:
            raise fail(f"{name}: {exc}") from None
        console.print(f"{name}: token key {kid} {'published' if change == 'put' else 'retired'}")


@token_app.command("publish")
def token_publish(
    topology: TopologyOpt = DEFAULT_TOPOLOGY,
    mesh: MeshOpt = localmesh.MESH,
    directory: DirOpt = None,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Publish the current token key's public half to every DC's etcd."""
    key = _trust(directory, home, mesh).token_key
    asyncio.run(_publish(topology, home, "put", key.kid, key.public_pem()))


@token_app.command("rotate")
def token_rotate(directory: DirOpt = None, home: HomeOpt = localmesh.DEFAULT_HOME) -> None:
    """Make a new token signing key; publish it, then retire the old one once its
    tokens have expired."""
    folder = _folder(directory, home)
    old = (folder / "token.kid").read_text().strip() if (folder / "token.kid").exists() else ""
    key = SigningKey.generate()
    write_secret(folder / "token.key", key.private_pem())
    write_secret(folder / "token.kid", key.kid.encode())
    console.print(f"new token key {key.kid}" + (f" (was {old})" if old else ""))


@token_app.command("retire")
def token_retire(
    kid: Annotated[str, typer.Argument(help="the key id to stop accepting")],
    topology: TopologyOpt = DEFAULT_TOPOLOGY,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Stop accepting tokens signed with key KID, in every DC."""
    asyncio.run(_publish(topology, home, "delete", kid))
