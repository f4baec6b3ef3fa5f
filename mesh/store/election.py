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

import aetcd

from mesh.errors import Unavailable
from mesh.store.etcd import ETCD_ERRORS, watch_events

log = logging.getLogger(__name__)


class Election:
    def __init__(
        self, client: aetcd.Client, prefix: bytes, lease: Callable[[], int], value: bytes
    ) -> None:
        self._client = client
        self._prefix = prefix.rstrip(b"/") + b"/"
        self._lease = lease
        self._value = value
        self.key = b""
        self.term = 0  # create revision of our key while we campaign or lead

    async def campaign(self) -> int:
        """Wait until this candidate leads; return its term."""
        tx = self._client.transactions
        self.key = self._prefix + f"{self._lease():x}".encode()
        try:
            ok, responses = await self._client.transaction(
                compare=[tx.create(self.key) == 0],
                success=[tx.put(self.key, self._value, lease=self._lease())],
                failure=[tx.get(self.key)],
            )
        except ETCD_ERRORS as exc:
            raise Unavailable(f"cannot campaign: {exc}") from exc
        if ok:
            self.term = responses[0].response_put.header.revision
        else:
            self.term = responses[0][0][1].create_revision
        while True:
            predecessor, revision = await self._predecessor()
            if predecessor is None:
                return self.term
            log.info("waiting for %s to leave", predecessor.decode(errors="replace"))
            async for event in watch_events(
                self._client, predecessor, prefix=False, start_revision=revision + 1
            ):
                if event.kind == aetcd.EventKind.DELETE:
                    break

    async def _predecessor(self) -> tuple[bytes | None, int]:
        """The candidate just ahead of us, and the revision of that reading."""
        try:
            listing = await self._client.get_prefix(self._prefix)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"cannot read the election: {exc}") from exc
        ahead = [kv for kv in listing if kv.create_revision < self.term]
        if not ahead:
            return None, listing.header.revision
        return max(ahead, key=lambda kv: kv.create_revision).key, listing.header.revision

    def fence(self) -> object:
        """The comparison that holds only while this candidate still leads its term."""
        return self._client.transactions.create(self.key) == self.term

    async def leads(self) -> bool:
        """Whether this candidate still leads its term, as etcd says now."""
        if not self.key:
            return False
        try:
            got = await self._client.get(self.key)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"cannot read the election: {exc}") from exc
        if got is None or got.create_revision != self.term:
            return False
        predecessor, _ = await self._predecessor()
        return predecessor is None

    async def leader(self) -> tuple[bytes, int] | None:
        """The leader's value and term, as anyone can read them."""
        try:
            listing = await self._client.get_prefix(self._prefix)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"cannot read the election: {exc}") from exc
        candidates = list(listing)
        if not candidates:
            return None
        first = min(candidates, key=lambda kv: kv.create_revision)
        return first.value, first.create_revision

    async def resign(self) -> None:
        """Step down (or out of the queue) at once: the next candidate leads."""
        if not self.key:
            return
        tx = self._client.transactions
        try:
            await self._client.transaction(
                compare=[tx.create(self.key) == self.term],
                success=[tx.delete(self.key)],
                failure=[],
            )
        except ETCD_ERRORS as exc:
            log.warning("could not resign: %s", exc)
        self.key, self.term = b"", 0
