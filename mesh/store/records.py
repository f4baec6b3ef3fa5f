"""Task records in the DC's etcd, so that any agent of the DC can Get, Watch and Cancel.

Every change is a compare-and-swap on the record's mod revision: concurrent writers never
lose each other's updates. A writer that acts for one run of a task passes its ``attempt``;
if the record has moved on to another attempt, the write is refused (``StaleWrite``), so
a zombie's late write never overwrites the current run's record.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.rpc
import grpc
from google.protobuf import json_format

from mesh.core.lifecycle import end
from mesh.core.listing import Page
from mesh.core.task import TERMINAL, public
from mesh.errors import MeshError, StaleWrite, TaskNotFound, Unavailable, Unsure
from mesh.store.etcd import ETCD_ERRORS, never_applied, stub_options, watch_events
from mesh.store.group import GroupCommit
from mesh.store.keys import KeySpace
from mesh.store.retention import Retention
from mesh.v1 import peer_pb2, tasks_pb2

log = logging.getLogger(__name__)

CAS_RETRIES = 16
QUIET_S = 5.0  # a follower that hears nothing this long reads the record itself
KNOWN = 4096  # records an agent remembers having written, for its next update of them


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


def _check_attempt(record: peer_pb2.TaskRecord, attempt: int) -> None:
    if record.status.attempt != attempt:
        raise StaleWrite(
            "task moved to another attempt",
            task_id=record.status.task_id,
            mine=attempt,
            current=record.status.attempt,
        )
    if record.status.state in TERMINAL:
        raise StaleWrite("task already finished", task_id=record.status.task_id)


# A mutation edits the record in place; returning False means "nothing to write".
Mutation = Callable[[peer_pb2.TaskRecord], bool | None]


class TaskStore:
    def __init__(
        self,
        client: aetcd.Client,
        keys: KeySpace,
        retention: Retention | None = None,
        commits: GroupCommit | None = None,
    ) -> None:
        """``retention``: finished records and pointers expire under its leases.
        ``commits``: the agent's group commit, shared by all it writes per task."""
        self._client = client
        self._keys = keys
        self._tx = client.transactions
        self._retention = retention
        self.commits = commits or GroupCommit(client)
        self._known: OrderedDict[str, Stored] = OrderedDict()

    async def _kept(self, record: peer_pb2.TaskRecord) -> int | None:
        """The retention lease a record is put under: a finished one, or one that only
        points to another DC; None for a task still under way here (it stays)."""
        if self._retention is None:
            return None
        if record.status.state in TERMINAL:
            return await self._retention.lease()
        if record.forwarded_to_dc:
            return await self._retention.lease(self._retention.pointer_extra_s)
        return None

    def _put(self, key: bytes, record: peer_pb2.TaskRecord, lease: int | None) -> object:
        return self._tx.put(key, encode(record), lease=lease)

    @property
    def client(self) -> aetcd.Client:
        return self._client

    @property
    def keys(self) -> KeySpace:
        return self._keys

    async def create(
        self, record: peer_pb2.TaskRecord, also: Sequence[object] = ()
    ) -> tuple[Stored, bool]:
        """Write the record unless its id exists; return what is stored and whether it is
        new. ``also`` are more operations done with the write, in its transaction.

        ``Unavailable`` means nothing was written; ``Unsure`` that it may have been."""
        key = self._keys.task(record.status.task_id)
        kept = await self._kept(record)
        try:
            ok, responses = await self.commits.transaction(
                compare=[self._tx.create(key) == 0],
                success=[self._put(key, record, kept), *also],
                failure=[self._tx.get(key)],
            )
        except ETCD_ERRORS as exc:
            if never_applied(exc):
                raise Unavailable(f"etcd: {exc}") from exc
            raise Unsure(f"etcd: {exc}; the task may have been recorded") from exc
        if ok:
            return self._remember(Stored(record, responses[0].response_put.header.revision)), True
        value, kv = responses[0][0]
        return Stored(decode(value), kv.mod_revision), False

    async def get(self, task_id: str) -> Stored:
        try:
            got = await self._client.get(self._keys.task(task_id))
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        if got is None:
            raise TaskNotFound("no such task", task_id=task_id)
        return Stored(decode(got.value), got.mod_revision)

    async def update(
        self,
        task_id: str,
        mutate: Mutation,
        *,
        attempt: int | None = None,
        lease: int = 0,
        fence: Sequence[object] = (),
        also: Sequence[object] = (),
        refusal: type[StaleWrite] = StaleWrite,
    ) -> Stored:
        """Apply ``mutate`` by compare-and-swap, retrying on concurrent changes.

        With ``attempt``, the write is fenced: refused if the record belongs to another
        attempt or is already terminal. With ``lease``, the write also puts (while the
        task runs) or deletes (once it is terminal) the running marker bound to it. With
        ``fence``, the write also needs those comparisons to hold (the queue owner's
        leadership, free quota slots), and ``refusal`` says when they did not. ``also`` are more
        operations done in the same transaction (the backlog entry that goes with it).
        """
        key = self._keys.task(task_id)
        current = self._known.pop(task_id, None)  # what this agent wrote last, unread
        checked = current is None
        for _ in range(CAS_RETRIES):
            if current is None:
                current = await self.get(task_id)
            record = peer_pb2.TaskRecord()
            record.CopyFrom(current.record)
            try:
                if attempt is not None:
                    _check_attempt(record, attempt)
                unchanged = mutate(record) is False
            except MeshError:
                if checked:
                    raise
                current, checked = None, True  # judged on our own last write: read it
                continue
            if unchanged:
                if checked:
                    return current
                current, checked = None, True
                continue
            ops = [self._put(key, record, await self._kept(record)), *also]
            if lease:
                marker = self._keys.running_marker(task_id)
                if record.status.state in TERMINAL:
                    ops.append(self._tx.delete(marker))
                else:
                    ops.append(self._tx.put(marker, record.status.agent.encode(), lease=lease))
            try:
                ok, responses = await self.commits.transaction(
                    compare=[self._tx.mod(key) == current.revision, *fence],
                    success=ops,
                    failure=[self._tx.get(key)],
                )
            except ETCD_ERRORS as exc:
                raise Unavailable(f"etcd: {exc}") from exc
            if ok:
                return self._remember(Stored(record, responses[0].response_put.header.revision))
            if not responses[0]:
                raise TaskNotFound("no such task", task_id=task_id)
            value, kv = responses[0][0]
            if fence and kv.mod_revision == current.revision:
                raise refusal("fenced out", task_id=task_id)
            current, checked = Stored(decode(value), kv.mod_revision), True
        raise StaleWrite("too much contention on the task record", task_id=task_id)

    def _remember(self, stored: Stored) -> Stored:
        """Keep a copy of a record this agent wrote, for its next update to start from
        (a wrong guess costs one failed compare, which returns the record as it is)."""
        task_id = stored.status.task_id
        if stored.status.state in TERMINAL:
            self._known.pop(task_id, None)
            return stored
        copy = peer_pb2.TaskRecord()
        copy.CopyFrom(stored.record)
        self._known[task_id] = Stored(copy, stored.revision)
        self._known.move_to_end(task_id)
        if len(self._known) > KNOWN:
            self._known.popitem(last=False)
        return stored

    async def finish(
        self, task_id: str, state: int, code: str, message: str, *, attempt: int | None = None
    ) -> Stored:
        """End the task with ``state`` and the reason, unless it has already ended."""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            if record.status.state in TERMINAL:
                return False
            end(record.status, state, code, message)
            return None

        return await self.update(task_id, mutate, attempt=attempt)

    async def scan(self) -> list[Stored]:
        """Every task record of the DC, with its revision."""
        try:
            listing = await self._client.get_prefix(self._keys.tasks)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return [Stored(decode(kv.value), kv.mod_revision) for kv in listing]

    async def delete(self, stored: Stored) -> bool:
        """Delete the record if it is still exactly ``stored``."""
        key = self._keys.task(stored.status.task_id)
        try:
            ok, _ = await self.commits.transaction(
                compare=[self._tx.mod(key) == stored.revision],
                success=[self._tx.delete(key)],
                failure=[],
            )
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return bool(ok)

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
            except aetcd.RevisionCompactedError:
                stored = await self.get(task_id)
                if stored.revision > after:
                    after = stored.revision
                    yield stored
                if stored.status.state in TERMINAL:
                    return

    async def _versions(self, task_id: str, after: int) -> AsyncIterator[Stored]:
        """The record's versions from its watch, and a read after each ``QUIET_S`` of
        silence. The watch runs in a task of its own, so a silence ends no stream."""
        heard: asyncio.Queue[aetcd.Event | BaseException] = asyncio.Queue()
        key = self._keys.task(task_id)

        async def pump() -> None:
            try:
                async for event in watch_events(
                    self._client, key, prefix=False, start_revision=after + 1
                ):
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
                if item.kind != aetcd.EventKind.PUT:
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
            for kv in kvs:
                record = decode(kv.value)
                status = record.status
                if record.forwarded_to_dc or record.superseded_by_dc:
                    continue  # listed in the DC it overflowed to, or that holds its id
                if (user_id and status.spec.user.id != user_id) or (
                    state and status.state != state
                ):
                    continue
                found.append(public(status))
                if len(found) == limit:
                    return Page(found, status.task_id if (more or kv is not kvs[-1]) else "")
            if not more:
                return Page(found, "")
            start = kvs[-1].key + b"\0"
        return Page(found, decode_id(start, self._keys))  # the scan budget is spent

    async def _range(self, start: bytes, end: bytes, limit: int) -> tuple[list[Any], bool]:
        """Up to ``limit`` keys of [start, end), and whether more follow. aetcd has no
        limited range, so this calls etcd's KV service with its stub and metadata."""
        request = aetcd.rpc.RangeRequest(key=start, range_end=end, limit=limit)
        try:
            reply = await self._client.kvstub.Range(request, **stub_options(self._client))
        except (grpc.aio.AioRpcError, *ETCD_ERRORS) as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return list(reply.kvs), reply.more


SCAN_PER_PAGE = 20
SCAN_BATCH = 500


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range end)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def decode_id(key: bytes, keys: KeySpace) -> str:
    return key.rstrip(b"\0")[len(keys.tasks) :].decode()
