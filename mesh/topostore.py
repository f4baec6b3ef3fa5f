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

from mesh.errors import ConfigError, Unavailable
from mesh.etcd import ETCD_ERRORS
from mesh.topology import Topology, parse

CURRENT = "current"


def directory(prefix: str) -> bytes:
    return f"/{prefix}/topology/".encode()


def key(prefix: str) -> bytes:
    return directory(prefix) + CURRENT.encode()


def digest(topology: Topology) -> str:
    return hashlib.sha256(topology.to_json().encode()).hexdigest()[:16]


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
