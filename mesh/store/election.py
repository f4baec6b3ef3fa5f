"""Leader election as etcd's own concurrency recipe does it, so etcd's tools see it.

A candidate writes ``{prefix}/{lease id in hex}`` under its lease (a create-revision-0
transaction), and leads once no key under the prefix has a lower create revision. Until
then it watches only its predecessor (the key just below it) for deletion: no polling,
no thundering herd when the leader goes. ``etcdctl elect -l {prefix}`` prints the leader.

The leader's key's create revision is its **term**; ``fence()`` gives the comparison
every leader write carries, so a deposed leader (its lease expired while it was paused)
can never write again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mesh.errors import Unavailable
from mesh.store import kv
from mesh.store.kv import Kv, prefix_end

log = logging.getLogger(__name__)


class Election:
    def __init__(self, store: Kv, prefix: bytes, lease: Callable[[], int], value: bytes) -> None:
        self._kv = store
        self._prefix = prefix.rstrip(b"/") + b"/"
        self._lease = lease
        self._value = value
        self.key = b""
        self.term = 0  # create revision of our key while we campaign or lead

    async def campaign(self) -> int:
        """Wait until this candidate leads; return its term."""
        self.key = self._prefix + f"{self._lease():x}".encode()
        try:
            done = await self._kv.txn(
                [kv.create(self.key) == 0],
                [kv.Put(self.key, self._value, self._lease())],
                [kv.Get(self.key)],
            )
        except Unavailable as exc:
            raise Unavailable(f"cannot campaign: {exc}") from exc
        found = done.results[0] if not done.succeeded else None
        self.term = found.create_revision if isinstance(found, kv.KeyValue) else done.revision
        while True:
            predecessor, revision = await self._predecessor()
            if predecessor is None:
                return self.term
            log.info("waiting for %s to leave", predecessor.decode(errors="replace"))
            async for event in self._kv.watch(
                predecessor, prefix=False, start_revision=revision + 1
            ):
                if event.kind == kv.EventKind.DELETE:
                    break

    async def _predecessor(self) -> tuple[bytes | None, int]:
        """The candidate just ahead of us, and the revision of that reading."""
        listing = await self._candidates()
        ahead = [c for c in listing.kvs if c.create_revision < self.term]
        if not ahead:
            return None, listing.revision
        return max(ahead, key=lambda c: c.create_revision).key, listing.revision

    async def _candidates(self) -> kv.Range:
        try:
            return await self._kv.range(self._prefix, prefix_end(self._prefix))
        except Unavailable as exc:
            raise Unavailable(f"cannot read the election: {exc}") from exc

    def fence(self) -> kv.Compare:
        """The comparison that holds only while this candidate still leads its term; out
        of the election, one that never holds (``create(b"") == 0`` would: no such key)."""
        if not self.key:
            return kv.version(self._prefix) < 0
        return kv.create(self.key) == self.term

    async def leads(self) -> bool:
        """Whether this candidate still leads its term, as etcd says now."""
        if not self.key:
            return False
        try:
            got = await self._kv.get(self.key)
        except Unavailable as exc:
            raise Unavailable(f"cannot read the election: {exc}") from exc
        if got is None or got.create_revision != self.term:
            return False
        predecessor, _ = await self._predecessor()
        return predecessor is None

    async def leader(self) -> tuple[bytes, int] | None:
        """The leader's value and term, as anyone can read them."""
        candidates = (await self._candidates()).kvs
        if not candidates:
            return None
        first = min(candidates, key=lambda c: c.create_revision)
        return first.value, first.create_revision

    async def resign(self) -> None:
        """Step down (or out of the queue) at once: the next candidate leads."""
        if not self.key:
            return
        try:
            await self._kv.txn([kv.create(self.key) == self.term], [kv.Delete(self.key)])
        except Unavailable as exc:
            log.warning("could not resign: %s", exc)
        self.key, self.term = b"", 0
