"""The DC's durable backlog in etcd: one key per waiting task, beside its record.

An entry is named ``<class>/<enqueued ms>/<task id>`` under the backlog prefix, so a
prefix read lists the queue in order without reading a record. Every write that adds or
takes an entry changes the task's record in the same transaction (``TaskStore.update``
with the entry's operation): the two never disagree. The queue owner's writes are also
fenced by its term (``Election.fence``), so a deposed owner takes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mesh.store import kv
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv, prefix_end
from mesh.store.mirror import PrefixMirror
from mesh.store.records import Mutation, Stored, TaskStore

log = logging.getLogger(__name__)


class Backlog:
    def __init__(self, store: Kv, keys: KeySpace, records: TaskStore) -> None:
        self._kv = store
        self._keys = keys
        self._records = records

    @property
    def dc(self) -> str:
        return self._keys.dc

    def entry(self, queue_class: str, enqueued_ms: int, task_id: str) -> bytes:
        return self._keys.backlog_entry(queue_class, enqueued_ms, task_id)

    def entry_of(self, name: str) -> bytes:
        """The key of an entry a record names (``TaskRecord.backlog_entry``)."""
        return self._keys.backlog + name.encode()

    def name_of(self, entry: bytes) -> str:
        return entry[len(self._keys.backlog) :].decode()

    def mirror(self, on_delta: Callable[[dict[str, bytes | None]], None]) -> PrefixMirror:
        """The backlog kept in memory, entry name to value, told of each change."""
        return PrefixMirror(self._kv, self._keys.backlog, on_delta=on_delta)

    async def names(self) -> list[str]:
        """Every entry's name, in queue order, without the values."""
        prefix = self._keys.backlog
        listing = await self._kv.range(prefix, prefix_end(prefix), keys_only=True)
        return [self.name_of(found.key) for found in listing.kvs]

    async def enqueue(
        self, task_id: str, entry: bytes, value: bytes, mutate: Mutation, attempt: int
    ) -> Stored:
        """Put the entry and change the record (``mutate``) in one write."""
        put = kv.Put(entry, value)
        return await self._records.update(task_id, mutate, attempt=attempt, also=[put])

    async def take(
        self, task_id: str, entry: bytes, mutate: Mutation, fences: tuple[kv.Compare, ...] = ()
    ) -> Stored:
        """Delete the entry and change the record in one write, which holds only while
        the entry is there and ``fences`` hold (``StaleWrite`` if not)."""
        return await self._records.update(
            task_id, mutate, fence=[*fences, kv.version(entry) > 0], also=[kv.Delete(entry)]
        )

    async def drop(
        self, entry: bytes, task_id: str, revision: int | None, fence: kv.Compare
    ) -> int | None:
        """Delete the entry without touching its record, if ``fence`` holds and the
        record is gone (``revision`` None) or still at ``revision``: the revision of the
        delete, or None if refused (a task put back reuses its key, and its fresh entry
        must not go with the stale one)."""
        record = self._keys.task(task_id)
        unchanged = kv.version(record) == 0 if revision is None else kv.mod(record) == revision
        done = await self._kv.txn([fence, unchanged], [kv.Delete(entry)])
        return done.revision if done.succeeded else None
