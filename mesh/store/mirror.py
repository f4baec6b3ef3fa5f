"""A local copy of every key under an etcd prefix, kept current by one watch.

List, then watch from the listed revision + 1, so no change falls between the two. A
broken watch resumes by itself (``Kv.watch``); a compacted revision forces a fresh list.

``on_delta`` hears what changed (a name's new value, or None when it went), in work
proportional to the change: the DC's 10,000 agent records are never copied for one
join. ``on_change`` hears the whole copy, for the small prefixes that want it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mesh.errors import Unavailable
from mesh.store import kv
from mesh.store.kv import Kv, prefix_end

log = logging.getLogger(__name__)

LIST_BACKOFF_S = (0.1, 0.2, 0.5, 1.0)  # a failed list is tried again after these


class PrefixMirror:
    def __init__(
        self,
        store: Kv,
        prefix: bytes,
        on_change: Callable[[dict[str, bytes]], None] | None = None,
        on_delta: Callable[[dict[str, bytes | None]], None] | None = None,
    ) -> None:
        self._kv = store
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
                listing = await self._kv.range(self._prefix, prefix_end(self._prefix))
                break
            except Unavailable as exc:
                delay = LIST_BACKOFF_S[min(failures, len(LIST_BACKOFF_S) - 1)]
                failures += 1
                log.warning("listing %s failed (%s); again in %.1fs", self._prefix, exc, delay)
                await asyncio.sleep(delay)
        listed: dict[str, bytes] = {self._name(found.key): found.value for found in listing.kvs}
        delta: dict[str, bytes | None] = dict.fromkeys(self.items.keys() - listed.keys())
        delta.update(
            (name, value) for name, value in listed.items() if self.items.get(name) != value
        )
        self.items = listed
        self.revision = listing.revision
        self._changed(delta)

    async def run(self) -> None:
        """Mirror forever; cancel the task to stop."""
        while True:
            await self._list()
            events = self._kv.watch(self._prefix, prefix=True, start_revision=self.revision + 1)
            try:
                async for event in events:
                    name = self._name(event.kv.key)
                    value: bytes | None = None
                    if event.kind == kv.EventKind.PUT:
                        value = self.items[name] = event.kv.value
                    else:
                        self.items.pop(name, None)
                    self.revision = max(self.revision, event.kv.mod_revision)
                    self._changed({name: value})
            except kv.Compacted:
                log.info("watch on %s compacted; listing again", self._prefix)
