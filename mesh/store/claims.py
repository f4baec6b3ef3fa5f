"""Claims on task ids, kept by the ids' home DC (``mesh.core.home``), and the tasks this
DC recorded without one.

A claim is written once, by compare-and-create: the first DC to claim an id holds it,
and every later claim reads who did. Its value is small JSON, ``{"dc", "digest", "at_ms"}``,
so a second Submit of the id through another DC can tell the same task from a different
one, and a claim whose DC never recorded the task can be told from one being recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mesh.store import kv
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv, prefix_end
from mesh.store.retention import Retention


@dataclass(frozen=True, slots=True)
class Claim:
    dc: str  # the DC that recorded the task
    digest: str  # its spec digest
    at_ms: int  # when it was claimed

    def encode(self) -> bytes:
        data = {"dc": self.dc, "digest": self.digest, "at_ms": self.at_ms}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Claim:
        data = json.loads(raw)
        return cls(str(data["dc"]), str(data["digest"]), int(data["at_ms"]))


class ClaimStore:
    def __init__(self, store: Kv, keys: KeySpace, retention: Retention | None = None) -> None:
        """``retention``: claims expire as the tasks they name would (with a pointer's
        extra time: the task may run that long before its record is kept)."""
        self._kv = store
        self._keys = keys
        self._retention = retention

    async def claim(self, task_id: str, claim: Claim) -> Claim:
        """Claim ``task_id`` for ``claim.dc`` unless it is held: the claim that holds."""
        key = self._keys.claim(task_id)
        compare, put = await self.unheld(task_id, claim)
        done = await self._kv.txn([compare], [put], [kv.Get(key)])
        if done.succeeded:
            return claim
        found = done.results[0]
        assert isinstance(found, kv.KeyValue), "a failed claim found the claim"
        return Claim.decode(found.value)

    async def unheld(self, task_id: str, claim: Claim) -> tuple[kv.Compare, kv.Put]:
        """The claim as a condition and a write for another transaction: ``task_id``
        unheld, and ``claim`` put (a Submit homed here claims as it records)."""
        key = self._keys.claim(task_id)
        retention = self._retention
        lease = await retention.lease(retention.pointer_extra_s) if retention else 0
        return kv.create(key) == 0, kv.Put(key, claim.encode(), lease)

    async def drop_stale(self, task_id: str, holder: str, claimed_before_ms: int) -> bool:
        """Drop the claim on ``task_id`` if ``holder`` still holds it and claimed it
        before ``claimed_before_ms``; whether it was dropped."""
        key = self._keys.claim(task_id)
        got = await self._kv.get(key)
        if got is None:
            return True
        found = Claim.decode(got.value)
        if found.dc != holder or found.at_ms >= claimed_before_ms:
            return False
        done = await self._kv.txn([kv.mod(key) == got.mod_revision], [kv.Delete(key)])
        return done.succeeded

    async def get(self, task_id: str) -> Claim | None:
        got = await self._kv.get(self._keys.claim(task_id))
        return None if got is None else Claim.decode(got.value)

    def mark_unclaimed(self, task_id: str) -> kv.Op:
        """The operation that notes a task recorded here without its home's claim: done
        in the transaction that records it, so none is ever left unnoted."""
        return kv.Put(self._keys.unclaimed_task(task_id), b"")

    async def unclaimed(self, limit: int) -> list[str]:
        """Up to ``limit`` tasks recorded here that still need their home's claim."""
        prefix = self._keys.unclaimed
        listing = await self._kv.range(prefix, prefix_end(prefix), limit, keys_only=True)
        return [found.key[len(prefix) :].decode() for found in listing.kvs]

    async def claimed(self, task_id: str) -> None:
        """The home answered for ``task_id``: nothing left to claim."""
        await self._kv.delete(self._keys.unclaimed_task(task_id))
