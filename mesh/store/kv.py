"""The key-value port under the store: exactly the etcd semantics the agent relies on.

Keys and values are bytes. Every change gets the next revision of the whole store; a key
remembers the revision that created it (``create_revision``), last changed it
(``mod_revision``) and how often it was written since (``version``). A transaction
compares keys (``mod(key) == rev``, ``version(key) > 0``, ``create(key) == 0``…) and
applies its success or its failure operations, all at one revision. A key put under a
lease vanishes when the lease expires or is revoked. A watch delivers every change to a
key or prefix from a revision on, in order, and raises ``Compacted`` when that revision
is gone; a broken watch raises ``Unavailable``, and resumes from the next revision.

Two implementations: ``mesh.store.etcdkv`` over a real etcd, and the simulator's
in-memory store (``sim``). One contract suite (``tests/store/test_kv_contract.py``) runs
unchanged against both; what it does not cover, the store does not use.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from mesh.errors import Unavailable


class Compacted(Unavailable):
    """A watch asked for revisions the store no longer keeps: read the current value."""

    def __init__(self, compacted: int) -> None:
        super().__init__(f"revisions up to {compacted} are compacted", compacted=compacted)
        self.compacted = compacted


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class Target(Enum):
    CREATE = "create"
    MOD = "mod"
    VERSION = "version"
    VALUE = "value"
    LEASE = "lease"


@dataclass(frozen=True, slots=True)
class Compare:
    key: bytes
    target: Target
    op: str  # "==", "!=", ">", "<"
    value: int | bytes

    def apply(self, actual: Any) -> Any:
        """``actual op value``: a truth for a number or bytes, and etcd's comparison
        object for an aetcd target (whose operators build it)."""
        return OPERATORS[self.op](actual, self.value)


OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}


class _On:
    """``create(key) == 0`` and its kind build a ``Compare``."""

    def __init__(self, key: bytes, target: Target) -> None:
        self._key, self._target = key, target

    def __eq__(self, value: object) -> Compare:  # type: ignore[override]
        return Compare(self._key, self._target, "==", value)  # type: ignore[arg-type]

    def __ne__(self, value: object) -> Compare:  # type: ignore[override]
        return Compare(self._key, self._target, "!=", value)  # type: ignore[arg-type]

    def __gt__(self, value: int | bytes) -> Compare:
        return Compare(self._key, self._target, ">", value)

    def __lt__(self, value: int | bytes) -> Compare:
        return Compare(self._key, self._target, "<", value)

    __hash__ = None  # type: ignore[assignment]


def create(key: bytes) -> _On:
    """The revision that created ``key`` (0: it does not exist)."""
    return _On(key, Target.CREATE)


def mod(key: bytes) -> _On:
    """The revision that last changed ``key`` (0: it does not exist)."""
    return _On(key, Target.MOD)


def version(key: bytes) -> _On:
    """How often ``key`` was written since it was created (0: it does not exist)."""
    return _On(key, Target.VERSION)


def value(key: bytes) -> _On:
    return _On(key, Target.VALUE)


def lease(key: bytes) -> _On:
    """The lease ``key`` is held under (0: none, or no such key)."""
    return _On(key, Target.LEASE)


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes


@dataclass(frozen=True, slots=True)
class If:
    """A transaction nested in another: its own comparisons and branches, applied in
    order with the rest (etcd 3.3 and later). Its result is whether they held."""

    compare: tuple[Compare, ...]
    success: tuple[Put | Delete | Get, ...]
    failure: tuple[Put | Delete | Get, ...] = ()


Op = Put | Delete | Get | If


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Whether the comparisons held, the store's revision after the transaction (it
    moves only if something changed), and each operation's result: a ``Get`` the
    ``KeyValue`` (None if absent), a ``Delete`` how many keys went, a ``Put`` None, an
    ``If`` whether its comparisons held."""

    succeeded: bool
    revision: int
    results: tuple[KeyValue | int | bool | None, ...]


class EventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    kv: KeyValue  # for a delete: the key, and the revision of the delete


@dataclass(frozen=True, slots=True)
class Range:
    kvs: tuple[KeyValue, ...]
    more: bool  # more keys in the range past ``limit``
    revision: int


class Kv(Protocol):
    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: bytes) -> KeyValue | None: ...

    async def range(
        self, start: bytes, end: bytes, limit: int = 0, keys_only: bool = False
    ) -> Range:
        """Keys in [start, end), in key order; at most ``limit`` (0: all)."""

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """The revision of the put."""

    async def delete(self, key: bytes) -> bool: ...

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """``Unavailable`` if it was certainly not applied, ``Unsure`` if it may have been."""

    async def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id."""

    async def keepalive(self, lease_id: int) -> int:
        """Refresh the lease; the seconds it has left (0: it is gone)."""

    async def revoke(self, lease_id: int) -> None: ...

    def watch(self, key: bytes, *, prefix: bool, start_revision: int) -> AsyncIterator[Event]:
        """Every change to ``key`` (or under it) from ``start_revision`` on, in order."""


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range end)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])
