"""The applied topology in etcd: ``/{prefix}/topology/current``, JSON with its version.

``meshctl topology apply`` writes it to every DC's etcd by compare-and-swap on the key's
revision, so two operators applying at once cannot silently overwrite each other; agents
mirror the key and switch to a new version only once it parses and validates whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import aetcd

from mesh.channels import Security
from mesh.errors import ConfigError, MeshError, Unavailable
from mesh.store.etcd import ETCD_ERRORS, client_for
from mesh.topology import Topology, parse

CURRENT = "current"


def directory(prefix: str) -> bytes:
    return f"/{prefix}/topology/".encode()


def token_keys(prefix: str) -> bytes:
    """Where the operator publishes the public keys bearer tokens are checked against,
    shared by every DC (``/{prefix}/trust/token-keys/{kid}``)."""
    return f"/{prefix}/trust/token-keys/".encode()


def key(prefix: str) -> bytes:
    return directory(prefix) + CURRENT.encode()


def digest(topology: Topology) -> str:
    """Identity of a topology's content: canonical JSON, so key order does not count."""
    canonical = json.dumps(json.loads(topology.to_json()), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Applied:
    version: int
    digest: str
    topology: Topology

    def encode(self) -> bytes:
        body = {"version": self.version, "digest": self.digest}
        body["topology"] = json.loads(self.topology.to_json())
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Applied:
        try:
            body = json.loads(raw)
            version, topology = int(body["version"]), body["topology"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: unreadable applied topology ({exc})") from None
        parsed = parse(topology, where)
        return cls(version, digest(parsed), parsed)


async def read(client: aetcd.Client, prefix: str) -> tuple[Applied | None, int]:
    """The applied topology (None if never applied) and the key's mod revision."""
    try:
        got = await client.get(key(prefix))
    except ETCD_ERRORS as exc:
        raise Unavailable(f"etcd: {exc}") from exc
    if got is None:
        return None, 0
    return Applied.decode(got.value, "applied topology"), got.mod_revision


async def write(client: aetcd.Client, prefix: str, applied: Applied, revision: int) -> bool:
    """Store ``applied`` if the key is still at ``revision`` (0: absent); False if not."""
    tx, k = client.transactions, key(prefix)
    guard = tx.create(k) == 0 if revision == 0 else tx.mod(k) == revision
    try:
        ok, _ = await client.transaction(
            compare=[guard], success=[tx.put(k, applied.encode())], failure=[]
        )
    except ETCD_ERRORS as exc:
        raise Unavailable(f"etcd: {exc}") from exc
    return bool(ok)


@dataclass(frozen=True, slots=True)
class DcState:
    """What one DC's etcd holds, or why it could not be read."""

    dc: str
    applied: Applied | None = None
    revision: int = 0
    error: str = ""


async def read_all(topology: Topology, security: Security) -> list[DcState]:
    """The applied topology in each DC that ``topology`` lists."""
    states = []
    for name, dc in topology.dcs.items():
        client = client_for(dc.etcd, security=security)
        try:
            await client.connect()
            applied, revision = await read(client, topology.prefix)
            states.append(DcState(name, applied, revision))
        except (MeshError, *ETCD_ERRORS) as exc:
            states.append(DcState(name, error=str(exc)))
        finally:
            await client.close()
    return states


async def apply(topology: Topology, security: Security) -> dict[str, str]:
    """Write ``topology`` to every DC's etcd as one new version; what happened, per DC.

    Nothing is written unless every DC could be read, so a version number is never
    reused; a DC changed by someone else meanwhile is reported and left alone.
    """
    states = await read_all(topology, security)
    unreadable = [s for s in states if s.error]
    if unreadable:
        return {s.dc: f"not applied anywhere: {s.dc} unreadable ({s.error})" for s in states}
    wanted = digest(topology)
    version = max((s.applied.version for s in states if s.applied), default=0) + 1
    new = Applied(version, wanted, topology)
    report = {}
    for state in states:
        if state.applied is not None and state.applied.digest == wanted:
            report[state.dc] = f"unchanged (v{state.applied.version})"
            continue
        client = client_for(topology.dcs[state.dc].etcd, security=security)
        try:
            await client.connect()
            written = await write(client, topology.prefix, new, state.revision)
        except (MeshError, *ETCD_ERRORS) as exc:
            report[state.dc] = f"failed: {exc}"
            continue
        finally:
            await client.close()
        report[state.dc] = f"applied v{version}" if written else "changed meanwhile: not applied"
    return report
