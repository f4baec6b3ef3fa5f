"""A local copy of every key under an etcd prefix, kept current by one watch.

List, then watch from the listed revision + 1, so no change falls between the two. A
broken watch resumes by itself (``watch_events``); a compacted revision forces a fresh list.

``on_delta`` hears what changed (a name's new value, or None when it went), in work
proportional to the change: the DC's 10,000 agent records are never copied for one
join. ``on_change`` hears the whole copy, for the small prefixes that want it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aetcd

from mesh.store.etcd import ETCD_ERRORS, RESUME_BACKOFF_S, watch_events

log = logging.getLogger(__name__)


class PrefixMirror:
    def __init__(
        self,
        client: aetcd.Client,
        prefix: bytes,
        on_change: Callable[[dict[str, bytes]], None] | None = None,
        on_delta: Callable[[dict[str, bytes | None]], None] | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._on_change = on_change
        self._on_delta = on_delta
        self.items: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self.revision = 0

    def _name(self, key: bytes) -> str:
        return key[len(self._prefix) :].decode()

    def _changed(self, delta: dict[str, bytes | None]) -> None:
        self.ready.set()
        if self._on_delta is not None:
            self._on_delta(delta)
        if self._on_change is not None:
            self._on_change(dict(self.items))

    async def _list(self) -> None:
        failures = 0
        while True:
            try:
                listing = await self._client.get_prefix(self._prefix)
                break
            except ETCD_ERRORS as exc:
                delay = RESUME_BACKOFF_S[min(failures, len(RESUME_BACKOFF_S) - 1)]
                failures += 1
                log.warning("listing %s failed (%s); again in %.1fs", self._prefix, exc, delay)
                await asyncio.sleep(delay)
        listed: dict[str, bytes] = {self._name(kv.key): kv.value for kv in listing}
        delta: dict[str, bytes | None] = dict.fromkeys(self.items.keys() - listed.keys())
        delta.update(
            (name, value) for name, value in listed.items() if self.items.get(name) != value
        )
        self.items = listed
        self.revision = listing.header.revision
        self._changed(delta)

    async def run(self) -> None:
        """Mirror forever; cancel the task to stop."""
        while True:
            await self._list()
            events = watch_events(
                self._client, self._prefix, prefix=True, start_revision=self.revision + 1
            )
            try:
                async for event in events:
                    name = self._name(event.kv.key)
                    value: bytes | None = None
                    if event.kind == aetcd.EventKind.PUT:
                        value = self.items[name] = event.kv.value
                    else:
                        self.items.pop(name, None)
                    self.revision = max(self.revision, event.kv.mod_revision)
                    self._changed({name: value})
            except aetcd.RevisionCompactedError:
                log.info("watch on %s compacted; listing again", self._prefix)
