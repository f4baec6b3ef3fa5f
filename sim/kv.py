"""A DC's etcd, simulated in memory: the key-value port (``mesh.store.kv``) with etcd's
semantics and none of its machinery.

One revision counter for the store; each key keeps its create and mod revisions and its
version; a transaction applies all its operations at one revision; a lease's keys go
when it expires (on the event loop's clock, so virtual time expires them) or is revoked;
every change is kept in a history from which a watch replays, until ``compact`` drops
it. Faults are switched on by the simulator: ``down`` (every call fails at once, as etcd
without quorum does; watches wait and resume once it is back), and ``unsure`` (the next
writes are applied but their callers hear they may not have been).

Deterministic: no threads, no wall clock, no randomness of its own; lease ids count up.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from mesh.errors import Unavailable, Unsure
from mesh.store import kv

RESUME_S = 0.1  # a broken watch looks again after this, as the real one backs off


@dataclass
class _Lease:
    ttl_s: int
    expires: float
    keys: set[bytes] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None


class SimKv:
    """One DC's store, shared by the simulated clients of every agent of the DC."""

    def __init__(self) -> None:
        self.revision = 1  # etcd starts at 1
        self.compacted = 0
        self.down = False
        self.unsure = 0  # the next this many writes are applied, but reported unsure
        self._data: dict[bytes, kv.KeyValue] = {}
        self._keys: list[bytes] = []  # sorted
        self._history: list[kv.Event] = []
        self.audit: list[kv.Event] = []  # every change ever, for the checker: never compacted
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 0x1000
        self._watchers: dict[int, tuple[bytes, bytes | None, asyncio.Event]] = {}
        self._next_watch = 0
        self._touched: list[bytes] = []  # keys changed since the watches were last woken
        self._back = asyncio.Event()
        self._dirty = False  # the transaction being applied changed something

    # -- faults ---------------------------------------------------------------------------

    def fail(self) -> None:
        self.down = True
        self._back.clear()
        for _, _, changed in self._watchers.values():  # each stream breaks
            changed.set()

    def recover(self) -> None:
        """A leader again: as etcd does, every lease starts a fresh TTL (none could be
        kept alive, nor expired, while there was none)."""
        self.down = False
        self._back.set()
        for lease_id in list(self._leases):
            self._arm(lease_id)

    def compact(self, revision: int) -> None:
        self.compacted = max(self.compacted, min(revision, self.revision))
        self._history = [e for e in self._history if e.kv.mod_revision >= self.compacted]

    def _check(self) -> None:
        if self.down:
            raise Unavailable("etcd: no leader (simulated)")

    def _written(self) -> None:
        if self.unsure:
            self.unsure -= 1
            raise Unsure("etcd: request timed out (simulated); it may have been applied")

    # -- reads ----------------------------------------------------------------------------

    async def connect(self) -> None:
        self._check()

    async def close(self) -> None:
        return None

    async def get(self, key: bytes) -> kv.KeyValue | None:
        self._check()
        return self._data.get(key)

    async def range(
        self, start: bytes, end: bytes, limit: int = 0, keys_only: bool = False
    ) -> kv.Range:
        self._check()
        first = bisect.bisect_left(self._keys, start)
        last = bisect.bisect_left(self._keys, end)
        keys = self._keys[first:last]
        more = bool(limit) and len(keys) > limit
        found = [self._data[k] for k in (keys[:limit] if limit else keys)]
        if keys_only:
            found = [replace(f, value=b"") for f in found]
        return kv.Range(tuple(found), more, self.revision)

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        result = await self.txn([], [kv.Put(key, value, lease)])
        return result.revision

    async def delete(self, key: bytes) -> bool:
        result = await self.txn([], [kv.Delete(key)])
        return bool(result.results[0])

    async def txn(
        self,
        compare: Sequence[kv.Compare],
        success: Sequence[kv.Op],
        failure: Sequence[kv.Op] = (),
    ) -> kv.TxnResult:
        self._check()
        for op in _flat((*success, *failure)):
            if isinstance(op, kv.Put) and op.lease and op.lease not in self._leases:
                raise Unavailable(f"etcd: requested lease not found ({op.lease:x})")
        held = all(self._holds(c) for c in compare)
        self._dirty = False
        revision = self.revision + 1  # taken only if something changes
        results = tuple(self._apply(op, revision) for op in (success if held else failure))
        result = kv.TxnResult(held, revision if self._dirty else self.revision, results)
        if self._dirty:
            self.revision = revision
            self._wake()
            self._written()
        return result

    def _holds(self, compare: kv.Compare) -> bool:
        found = self._data.get(compare.key)
        actual: int | bytes
        match compare.target:
            case kv.Target.CREATE:
                actual = found.create_revision if found else 0
            case kv.Target.MOD:
                actual = found.mod_revision if found else 0
            case kv.Target.VERSION:
                actual = found.version if found else 0
            case kv.Target.LEASE:
                actual = found.lease if found else 0
            case kv.Target.VALUE:
                if found is None:
                    return False  # etcd: a value comparison with no key fails
                actual = found.value
        return bool(compare.apply(actual))

    def _apply(self, op: kv.Op, revision: int) -> kv.KeyValue | int | bool | None:
        if isinstance(op, kv.If):
            held = all(self._holds(c) for c in op.compare)
            for nested in op.success if held else op.failure:
                self._apply(nested, revision)
            return held
        if isinstance(op, kv.Get):
            return self._data.get(op.key)
        old = self._data.get(op.key)
        self._dirty = self._dirty or isinstance(op, kv.Put) or old is not None
        if isinstance(op, kv.Delete):
            if old is None:
                return 0
            self._remove(old)
            gone = kv.KeyValue(op.key, b"", 0, revision, 0)
            self._record(kv.Event(kv.EventKind.DELETE, gone))
            return 1
        if old is not None and old.lease:
            self._leases[old.lease].keys.discard(op.key)
        new = kv.KeyValue(
            op.key,
            op.value,
            old.create_revision if old else revision,
            revision,
            old.version + 1 if old else 1,
            op.lease,
        )
        if old is None:
            bisect.insort(self._keys, op.key)
        self._data[op.key] = new
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        self._record(kv.Event(kv.EventKind.PUT, new))
        return None

    def _record(self, event: kv.Event) -> None:
        self._history.append(event)
        self.audit.append(event)
        self._touched.append(event.kv.key)

    def _remove(self, old: kv.KeyValue) -> None:
        del self._data[old.key]
        del self._keys[bisect.bisect_left(self._keys, old.key)]
        if old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(old.key)

    # -- leases ---------------------------------------------------------------------------

    async def grant(self, ttl_s: int) -> int:
        self._check()
        self._next_lease += 1
        lease_id = self._next_lease
        self._leases[lease_id] = _Lease(ttl_s, 0.0)
        self._arm(lease_id)
        return lease_id

    async def keepalive(self, lease_id: int) -> int:
        self._check()
        if lease_id not in self._leases:
            return 0
        self._arm(lease_id)
        return self._leases[lease_id].ttl_s

    async def revoke(self, lease_id: int) -> None:
        self._check()
        self._expire(lease_id)

    def _arm(self, lease_id: int) -> None:
        lease = self._leases[lease_id]
        loop = asyncio.get_running_loop()
        lease.expires = loop.time() + lease.ttl_s
        if lease.timer is not None:
            lease.timer.cancel()
        lease.timer = loop.call_at(lease.expires, self._expire, lease_id)

    def _expire(self, lease_id: int) -> None:
        """The lease is gone, and its keys with it, at one revision (not while there is
        no leader to expire it: ``recover`` renews it)."""
        if self.down and lease_id in self._leases:
            return
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.timer is not None:
            lease.timer.cancel()
        if not lease.keys:
            return
        revision = self.revision + 1
        for key in sorted(lease.keys):
            old = self._data.get(key)
            if old is not None and old.lease == lease_id:
                self._remove(old)
                gone = kv.KeyValue(key, b"", 0, revision, 0)
                self._record(kv.Event(kv.EventKind.DELETE, gone))
        self.revision = revision
        self._wake()

    # -- watches --------------------------------------------------------------------------

    def _wake(self) -> None:
        """Wake the watches whose keys the last change touched (only those: a DC's
        dozens of watches each woken by every write cost the simulator a fifth of its
        time), in the order they began."""
        touched, self._touched = self._touched, []
        for key, end, changed in self._watchers.values():
            for k in touched:  # loops, not any(): this runs for every watch at every write
                if k == key or (end is not None and key <= k < end):
                    changed.set()
                    break

    async def watch(
        self, key: bytes, *, prefix: bool, start_revision: int
    ) -> AsyncIterator[kv.Event]:
        end = kv.prefix_end(key) if prefix else None
        next_revision = max(1, start_revision)
        changed = asyncio.Event()
        watch_id, self._next_watch = self._next_watch, self._next_watch + 1
        self._watchers[watch_id] = (key, end, changed)
        try:
            while True:
                if self.down:  # the stream broke: it resumes once etcd is back
                    await self._back.wait()
                    await asyncio.sleep(RESUME_S)
                    continue
                if next_revision < self.compacted:
                    raise kv.Compacted(self.compacted)
                changed.clear()
                events = self._since(next_revision)
                if not events:
                    await changed.wait()
                    continue
                for event in events:  # a copy: what happens while one is read is next
                    next_revision = event.kv.mod_revision + 1
                    if event.kv.key == key or (end is not None and key <= event.kv.key < end):
                        yield event
        finally:
            del self._watchers[watch_id]

    def _since(self, revision: int) -> list[kv.Event]:
        first = bisect.bisect_left(self._history, revision, key=lambda e: e.kv.mod_revision)
        return self._history[first:]


def _flat(ops: Sequence[kv.Op]) -> list[kv.Op]:
    """The operations, nested transactions' included."""
    flat: list[kv.Op] = []
    for op in ops:
        flat += _flat((*op.success, *op.failure)) if isinstance(op, kv.If) else [op]
    return flat


class Connection:
    """One agent's client of its DC's store: the store's answers, held while the agent
    is paused and refused once it crashed (``Endpoint.gate``), as its process's would."""

    def __init__(self, store: SimKv, process: Gate) -> None:
        self._store = store
        self._process = process

    async def connect(self) -> None:
        await self._process.gate()
        await self._store.connect()

    async def close(self) -> None:
        return None

    async def get(self, key: bytes) -> kv.KeyValue | None:
        await self._process.gate()
        return await self._store.get(key)

    async def range(
        self, start: bytes, end: bytes, limit: int = 0, keys_only: bool = False
    ) -> kv.Range:
        await self._process.gate()
        return await self._store.range(start, end, limit, keys_only)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        await self._process.gate()
        return await self._store.put(key, value, lease)

    async def delete(self, key: bytes) -> bool:
        await self._process.gate()
        return await self._store.delete(key)

    async def txn(
        self,
        compare: Sequence[kv.Compare],
        success: Sequence[kv.Op],
        failure: Sequence[kv.Op] = (),
    ) -> kv.TxnResult:
        await self._process.gate()
        return await self._store.txn(compare, success, failure)

    async def grant(self, ttl_s: int) -> int:
        await self._process.gate()
        return await self._store.grant(ttl_s)

    async def keepalive(self, lease_id: int) -> int:
        await self._process.gate()
        return await self._store.keepalive(lease_id)

    async def revoke(self, lease_id: int) -> None:
        await self._process.gate()
        await self._store.revoke(lease_id)

    async def watch(
        self, key: bytes, *, prefix: bool, start_revision: int
    ) -> AsyncIterator[kv.Event]:
        async for event in self._store.watch(key, prefix=prefix, start_revision=start_revision):
            await self._process.gate()
            yield event


class Gate(Protocol):
    async def gate(self) -> None: ...
