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

import aetcd

from mesh.errors import Unavailable
from mesh.store.etcd import ETCD_ERRORS
from mesh.store.keys import KeySpace
from mesh.store.mirror import PrefixMirror
from mesh.store.records import Mutation, Stored, TaskStore

log = logging.getLogger(__name__)


class Backlog:
    def __init__(self, client: aetcd.Client, keys: KeySpace, records: TaskStore) -> None:
        self._client = client
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
        return PrefixMirror(self._client, self._keys.backlog, on_delta=on_delta)

    async def names(self) -> list[str]:
        """Every entry's name, in queue order, without the values."""
        try:
            listing = await self._client.get_prefix(self._keys.backlog, keys_only=True)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return [self.name_of(kv.key) for kv in listing]

    async def enqueue(
        self, task_id: str, entry: bytes, value: bytes, mutate: Mutation, attempt: int
    ) -> Stored:
        """Put the entry and change the record (``mutate``) in one write."""
        put = self._client.transactions.put(entry, value)
        return await self._records.update(task_id, mutate, attempt=attempt, also=[put])

    async def take(
        self, task_id: str, entry: bytes, mutate: Mutation, fences: tuple[object, ...] = ()
    ) -> Stored:
        """Delete the entry and change the record in one write, which holds only while
        the entry is there and ``fences`` hold (``StaleWrite`` if not)."""
        tx = self._client.transactions
        return await self._records.update(
            task_id, mutate, fence=[*fences, tx.version(entry) > 0], also=[tx.delete(entry)]
        )

    async def drop(
        self, entry: bytes, task_id: str, revision: int | None, fence: object
    ) -> int | None:
        """Delete the entry without touching its record, if ``fence`` holds and the
        record is gone (``revision`` None) or still at ``revision``: the revision of the
        delete, or None if refused (a task put back reuses its key, and its fresh entry
        must not go with the stale one)."""
        tx = self._client.transactions
        record = self._keys.task(task_id)
        unchanged = tx.version(record) == 0 if revision is None else tx.mod(record) == revision
        try:
            ok, responses = await self._client.transaction(
                compare=[fence, unchanged], success=[tx.delete(entry)], failure=[]
            )
        except ETCD_ERRORS as exc:
            raise Unavailable(f"backlog claim failed: {exc}") from exc
        return responses[0].response_delete_range.header.revision if ok else None
