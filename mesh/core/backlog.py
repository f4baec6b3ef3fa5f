"""The DC's durable backlog: tasks waiting for capacity, in etcd, one key per task.

``/{prefix}/{dc}/backlog/{class}/{enqueued_ms}-{task_id}`` holds ``{"deadline_ms": …,
"tenant": …, "kind": …, "gpus": …}``: the key says the class and the age, the value the
deadline and what a priority policy looks at, so the queue owner orders the backlog and
expires what waited too long from a mirror of the prefix, without reading a record per
entry. Entries are ordered by the same priority policy as every agent's local queue
(``mesh.core.priority``, with aging so nothing starves).

A task enters with its record in one transaction. An entry leaves only by a *claim*: one
transaction, fenced by the owner's term, that deletes the entry if it still exists and
changes the record with it (placed, cancelled, expired). So an entry is taken once, and
nothing can take it without saying what became of its task.

A dispatch ``Round`` works on a bounded snapshot of the mirror: every entry it hands out
leaves the round, whatever becomes of it, so a round always ends.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from mesh.core import classes
from mesh.core.priority import Policy, Traits
from mesh.core.task import TERMINAL
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb


@dataclass(frozen=True, slots=True, order=True)
class Waiting:
    enqueued_ms: int
    task_id: str
    queue_class: str
    deadline_ms: int = 0  # 0: not known from the entry (read the record)
    tenant: str = ""
    kind: str = ""
    gpus: int = 1
    task_class: str = classes.BATCH

    @property
    def traits(self) -> Traits:
        return Traits(self.queue_class, self.tenant, self.kind, self.gpus, self.task_class)


MAX_TEXT = 256  # longest tenant or kind an entry may carry


def entry_value(deadline_ms: int, traits: Traits) -> bytes:
    fields = {"deadline_ms": deadline_ms, "tenant": traits.tenant, "kind": traits.kind}
    fields |= {"gpus": traits.gpus, "class": traits.task_class}
    return json.dumps(fields, separators=(",", ":")).encode()


def _fields(raw: object) -> dict[str, object]:
    if not isinstance(raw, bytes | str):
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _positive(value: object, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return default
    return value


def _text(value: object) -> str:
    return value if isinstance(value, str) and len(value) <= MAX_TEXT else ""


def parse(name: str, value: object = b"") -> Waiting | None:
    """A backlog key's tail (``class/enqueued-task``) and its value; None if not ours. A
    value that does not parse leaves the defaults (the record is read before dispatch).
    Each entry is parsed once: the owner reads the whole backlog every round."""
    if isinstance(value, bytes | str):
        return _parsed(name, value)
    return _parse(name, value)


@functools.lru_cache(maxsize=1 << 16)
def _parsed(name: str, value: bytes | str) -> Waiting | None:
    return _parse(name, value)


def _parse(name: str, value: object) -> Waiting | None:
    queue_class, _, rest = name.partition("/")
    stamp, _, task_id = rest.partition("-")
    if not queue_class or not task_id or not stamp.isdigit():
        return None
    fields = _fields(value)
    return Waiting(
        int(stamp),
        task_id,
        queue_class,
        _positive(fields.get("deadline_ms"), 0),
        _text(fields.get("tenant")),
        _text(fields.get("kind")),
        _positive(fields.get("gpus"), 1),
        classes.ONLINE if fields.get("class") == classes.ONLINE else classes.BATCH,
    )


def entries(snapshot: Mapping[str, object]) -> list[Waiting]:
    """Every entry of a backlog snapshot (key tails and values) that parses."""
    return [w for w in map(parse, snapshot, snapshot.values()) if w is not None]


def by_class(snapshot: Mapping[str, object]) -> dict[str, list[Waiting]]:
    """The backlog per class, oldest first."""
    classes: dict[str, list[Waiting]] = {}
    for waiting in entries(snapshot):
        classes.setdefault(waiting.queue_class, []).append(waiting)
    for waiting_list in classes.values():
        waiting_list.sort()
    return classes


def expired(snapshot: Mapping[str, object], now_ms: int) -> list[Waiting]:
    """Entries whose task's deadline has passed: they end without waiting for room."""
    return sorted(w for w in entries(snapshot) if w.deadline_ms and w.deadline_ms <= now_ms)


@dataclass(frozen=True, slots=True)
class Depth:
    depth: int
    oldest_ms: int  # enqueue time of the oldest entry; 0 when empty


def depths(classes: Mapping[str, list[Waiting]]) -> dict[str, Depth]:
    return {
        name: Depth(len(waiting), waiting[0].enqueued_ms if waiting else 0)
        for name, waiting in classes.items()
    }


class Round:
    """One dispatch pass over a snapshot, best entry first by the priority policy.

    ``pop`` hands out each entry at most once, so a round over ``n`` entries ends after
    at most ``n`` pops, whatever the caller does with them. ``refund`` undoes the policy's
    accounting for the last pop when it moved nothing (no room): the round then ends, and
    the entry is first again next time.
    """

    def __init__(self, entries: Iterable[Waiting], policy: Policy) -> None:
        self._lanes: dict[Traits, list[Waiting]] = {}
        for waiting in sorted(entries):
            self._lanes.setdefault(waiting.traits, []).append(waiting)
        self._policy = policy
        self._state: object = None

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self._lanes.values())

    def pop(self, now_ms: int) -> Waiting | None:
        heads = {lane: waiting[0].enqueued_ms / 1000 for lane, waiting in self._lanes.items()}
        self._state = self._policy.snapshot()
        chosen = self._policy.choose(heads, now_ms / 1000)
        if chosen is None:
            return None
        waiting = self._lanes[chosen].pop(0)
        if not self._lanes[chosen]:
            del self._lanes[chosen]
        return waiting

    def refund(self) -> None:
        if self._state is not None:
            self._policy.restore(self._state)
            self._state = None


class Room(Enum):
    """Whether the DC has room for a task now, as the router sees it."""

    FREE = "free"  # an agent may take it
    FULL = "full"  # its eligible agents are all full: it waits, and those behind it too
    NOT_HERE = "not here"  # no agent of the DC can run it now: it waits, others go ahead


class Verdict(Enum):
    """What the owner does with an entry, from its task's record."""

    DISPATCH = "dispatch"  # waiting in the backlog: place it when there is room
    CANCEL = "cancel"  # a cancel was asked for while it waited
    EXPIRE = "expire"  # its deadline passed while it waited
    STALE = "stale"  # the record has moved on (ended, or placed): only the entry is left


def judge(record: peer_pb2.TaskRecord, now_ms: int) -> Verdict:
    status = record.status
    if status.state in TERMINAL or record.forwarded_to_dc:
        return Verdict.STALE
    if status.agent or status.state != pb.TASK_STATE_QUEUED:
        return Verdict.STALE  # placed on an agent (or taken for placing) meanwhile
    if record.cancel_requested:
        return Verdict.CANCEL
    if status.HasField("deadline") and status.deadline.ToMilliseconds() <= now_ms:
        return Verdict.EXPIRE
    return Verdict.DISPATCH
