"""Reading task records: one, all, a page of them, and every version of one as it
changes (a watch that resumes from a revision, and reads when it falls silent)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from mesh.core.listing import Page
from mesh.core.task import TERMINAL, public
from mesh.errors import TaskNotFound
from mesh.store import kv
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv, prefix_end
from mesh.v1 import peer_pb2, tasks_pb2

QUIET_S = 5.0  # a follower that hears nothing this long reads the record itself
SCAN_PER_PAGE = 20
SCAN_BATCH = 500


@dataclass(frozen=True, slots=True)
class Stored:
    record: peer_pb2.TaskRecord
    revision: int  # the key's mod revision: the CAS token

    @property
    def status(self) -> tasks_pb2.TaskStatus:
        return self.record.status


def encode(record: peer_pb2.TaskRecord) -> bytes:
    """Binary protobuf: a third of the agent's record CPU that JSON cost, and smaller."""
    return record.SerializeToString()


def decode(raw: bytes) -> peer_pb2.TaskRecord:
    """A stored record; one an older agent wrote as JSON is read as such."""
    if raw[:1] == b"{":
        return json_format.Parse(raw, peer_pb2.TaskRecord(), ignore_unknown_fields=True)
    return peer_pb2.TaskRecord.FromString(raw)


class RecordReads:
    def __init__(self, store: Kv, keys: KeySpace) -> None:
        self._kv = store
        self._keys = keys

    async def get(self, task_id: str) -> Stored:
        got = await self._kv.get(self._keys.task(task_id))
        if got is None:
            raise TaskNotFound("no such task", task_id=task_id)
        return Stored(decode(got.value), got.mod_revision)

    async def scan(self) -> list[Stored]:
        """Every task record of the DC, with its revision."""
        listing = await self._kv.range(self._keys.tasks, prefix_end(self._keys.tasks))
        return [Stored(decode(found.value), found.mod_revision) for found in listing.kvs]

    async def follow(self, task_id: str, after: int = 0) -> AsyncIterator[Stored]:
        """Every version of the record after revision ``after`` until it is terminal; with
        no ``after``, the current one first. Versions are replayed from etcd's history,
        so a follower that resumes after the last revision it saw misses none and sees
        none twice (unless history was compacted: then it gets the current version).
        Should the watch stay silent for ``QUIET_S``, the record is read instead: a
        follower never waits on a watch event that was lost on the way."""
        stored = await self.get(task_id)
        if not after:
            yield stored
            after = stored.revision
        if stored.revision <= after and stored.status.state in TERMINAL:
            return  # nothing after what the follower saw, and nothing will come
        while True:
            try:
                async for stored in self._versions(task_id, after):
                    if stored.revision <= after:
                        continue  # a read got ahead of the watch: seen already
                    after = stored.revision
                    yield stored
                    if stored.status.state in TERMINAL:
                        return
            except kv.Compacted as gone:
                stored = await self.get(task_id)
                if stored.revision > after:
                    yield stored
                if stored.status.state in TERMINAL:
                    return
                # Watch on from past the compaction, not from the version just read: a
                # record unchanged since before it would find its history gone again,
                # and the follower would spin on the store.
                after = max(after, stored.revision, gone.compacted)

    async def _versions(self, task_id: str, after: int) -> AsyncIterator[Stored]:
        """The record's versions from its watch, and a read after each ``QUIET_S`` of
        silence. The watch runs in a task of its own, so a silence ends no stream."""
        heard: asyncio.Queue[kv.Event | BaseException] = asyncio.Queue()
        key = self._keys.task(task_id)

        async def pump() -> None:
            try:
                async for event in self._kv.watch(key, prefix=False, start_revision=after + 1):
                    heard.put_nowait(event)
            except Exception as exc:  # handed to the follower, who raises it
                heard.put_nowait(exc)

        pumping = asyncio.create_task(pump())
        try:
            while True:
                try:
                    async with asyncio.timeout(QUIET_S):
                        item = await heard.get()
                except TimeoutError:
                    yield await self.get(task_id)
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item.kind != kv.EventKind.PUT:
                    raise TaskNotFound("task record was deleted", task_id=task_id)
                yield Stored(decode(item.kv.value), item.kv.mod_revision)
        finally:
            pumping.cancel()

    async def list(
        self, *, user_id: str, state: int, limit: int, after: str = ""
    ) -> Page[tasks_pb2.TaskStatus]:
        """One page of the tasks that run in this DC, filtered, in task-id order, from
        the task after ``after``. A task that overflowed to another DC is listed there.
        At most ``SCAN_PER_PAGE`` x ``limit`` records are read for one page, so a filter
        that matches little costs short pages, never an unbounded scan."""
        start = self._keys.task(after) + b"\0" if after else self._keys.tasks
        end = prefix_end(self._keys.tasks)
        found: list[tasks_pb2.TaskStatus] = []
        budget = SCAN_PER_PAGE * max(1, limit)
        while budget > 0:
            batch = min(budget, SCAN_BATCH)
            kvs, more = await self._range(start, end, batch)
            budget -= len(kvs)
            for found_kv in kvs:
                record = decode(found_kv.value)
                status = record.status
                if record.forwarded_to_dc or record.superseded_by_dc:
                    continue  # listed in the DC it overflowed to, or that holds its id
                if (user_id and status.spec.user.id != user_id) or (
                    state and status.state != state
                ):
                    continue
                found.append(public(status))
                if len(found) == limit:
                    return Page(found, status.task_id if (more or found_kv is not kvs[-1]) else "")
            if not more:
                return Page(found, "")
            start = kvs[-1].key + b"\0"
        return Page(found, decode_id(start, self._keys))  # the scan budget is spent

    async def _range(self, start: bytes, end: bytes, limit: int) -> tuple[list[Any], bool]:
        """Up to ``limit`` keys of [start, end), and whether more follow."""
        found = await self._kv.range(start, end, limit)
        return list(found.kvs), found.more


def decode_id(key: bytes, keys: KeySpace) -> str:
    return key.rstrip(b"\0")[len(keys.tasks) :].decode()
