"""Task records in the DC's etcd, so that any agent of the DC can Get, Watch and Cancel.

Every change is a compare-and-swap on the record's mod revision: concurrent writers never
lose each other's updates. A writer that acts for one run of a task passes its ``attempt``;
if the record has moved on to another attempt, the write is refused (``StaleWrite``), so
a zombie's late write never overwrites the current run's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from mesh.core.lifecycle import end
from mesh.core.task import TERMINAL
from mesh.errors import MeshError, StaleWrite, TaskNotFound, Unsure
from mesh.store import kv
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv
from mesh.store.reads import RecordReads, Stored, decode, encode
from mesh.store.retention import Retention
from mesh.v1 import peer_pb2

log = logging.getLogger(__name__)

CAS_RETRIES = 16
KNOWN = 4096  # records an agent remembers having written, for its next update of them


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


@dataclass(slots=True)
class _Turn:
    """The updates of one record this agent has under way or waiting."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


# A mutation edits the record in place; returning False means "nothing to write".
Mutation = Callable[[peer_pb2.TaskRecord], bool | None]


class TaskStore(RecordReads):
    """Task records, written by compare-and-swap (``RecordReads`` reads them)."""

    def __init__(self, store: Kv, keys: KeySpace, retention: Retention | None = None) -> None:
        """``retention``: finished records and pointers expire under its leases."""
        super().__init__(store, keys)
        self._retention = retention
        self._known: OrderedDict[str, Stored] = OrderedDict()
        self._turns: dict[str, _Turn] = {}

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

    async def create(
        self, record: peer_pb2.TaskRecord, also: Sequence[kv.Op] = ()
    ) -> tuple[Stored, bool]:
        """Write the record unless its id exists; return what is stored and whether it is
        new. ``also`` are more operations done with the write, in its transaction.

        ``Unavailable`` means nothing was written; ``Unsure`` that it may have been."""
        done = await self._create(record, also, ())
        if done.succeeded:
            return self._remember(Stored(record, done.revision)), True
        found = done.results[0]
        assert isinstance(found, kv.KeyValue), "a failed create found the record"
        return Stored(decode(found.value), found.mod_revision), False

    async def create_if(
        self, record: peer_pb2.TaskRecord, given: Sequence[kv.Compare], also: Sequence[kv.Op]
    ) -> Stored | None:
        """``create`` when the conditions ``given`` hold as well; None when the id exists
        or a condition failed (nothing was written: the caller finds out which)."""
        done = await self._create(record, also, given)
        return self._remember(Stored(record, done.revision)) if done.succeeded else None

    async def _create(
        self, record: peer_pb2.TaskRecord, also: Sequence[kv.Op], given: Sequence[kv.Compare]
    ) -> kv.TxnResult:
        key = self._keys.task(record.status.task_id)
        kept = await self._kept(record)
        try:
            return await self._kv.txn(
                [kv.create(key) == 0, *given],
                [kv.Put(key, encode(record), kept or 0), *also],
                [kv.Get(key)],
            )
        except Unsure as exc:
            raise Unsure(f"{exc.message}; the task may have been recorded") from exc

    async def apply(self, operations: Sequence[kv.Op]) -> None:
        """Operations the store built for another write (quota slots given back, GPU time
        spent) in a write of their own, when the record write they came with is refused
        or there is none."""
        await self._kv.txn([], operations)

    async def update(
        self,
        task_id: str,
        mutate: Mutation,
        *,
        attempt: int | None = None,
        lease: int = 0,
        fence: Sequence[kv.Compare] = (),
        also: Sequence[kv.Op] = (),
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
        async with self._turn(task_id):
            return await self._update(task_id, mutate, attempt, lease, fence, also, refusal)

    @contextlib.asynccontextmanager
    async def _turn(self, task_id: str) -> AsyncIterator[None]:
        """One update of a record at a time from this agent, so that the next starts from
        the last one's write instead of racing it to a failed compare and a read (a task
        accepted here starts as its accepting write is under way)."""
        turn = self._turns.get(task_id)
        if turn is None:
            turn = self._turns[task_id] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[task_id]

    async def _update(
        self,
        task_id: str,
        mutate: Mutation,
        attempt: int | None,
        lease: int,
        fence: Sequence[kv.Compare],
        also: Sequence[kv.Op],
        refusal: type[StaleWrite],
    ) -> Stored:
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
            ops = [*await self._writes(key, record, lease), *also]
            done = await self._kv.txn([kv.mod(key) == current.revision, *fence], ops, [kv.Get(key)])
            if done.succeeded:
                return self._remember(Stored(record, done.revision))
            found = done.results[0]
            if not isinstance(found, kv.KeyValue):
                raise TaskNotFound("no such task", task_id=task_id)
            if fence and found.mod_revision == current.revision:
                raise refusal("fenced out", task_id=task_id)
            current, checked = Stored(decode(found.value), found.mod_revision), True
        raise StaleWrite("too much contention on the task record", task_id=task_id)

    async def _writes(self, key: bytes, record: peer_pb2.TaskRecord, lease: int) -> list[kv.Op]:
        """The record's put, under its retention lease; with a run's ``lease``, its
        running marker put (or deleted, once the record is terminal) too."""
        ops: list[kv.Op] = [kv.Put(key, encode(record), await self._kept(record) or 0)]
        if lease:
            marker = self._keys.running_marker(record.status.task_id)
            if record.status.state in TERMINAL:
                ops.append(kv.Delete(marker))
            else:
                ops.append(kv.Put(marker, record.status.agent.encode(), lease))
        return ops

    def known(self, task_id: str) -> Stored | None:
        """The record as this agent last wrote it, if it did and the record is under way
        (it may have moved on since: a guess, as ``update`` starts from)."""
        return self._known.get(task_id)

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

    async def delete(self, stored: Stored) -> bool:
        """Delete the record if it is still exactly ``stored``."""
        key = self._keys.task(stored.status.task_id)
        done = await self._kv.txn([kv.mod(key) == stored.revision], [kv.Delete(key)])
        return done.succeeded
