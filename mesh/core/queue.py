"""An agent's local queue: waiting tasks in lanes, the next one chosen by a priority policy
(``mesh.core.priority``). Pure, driven by an injected time. It is bounded, and it knows
the queue classes it accepts: a class that is retired stops taking tasks at once but is
served until it is empty.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from mesh.core.priority import Policy, Traits
from mesh.errors import InvalidTask, LimitExceeded

T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    enqueued_at: float


class LaneQueue(Generic[T]):
    def __init__(
        self,
        policy: Policy,
        traits: Callable[[T], Traits],
        classes: Iterable[str],
        max_len: int,
    ) -> None:
        """``traits`` says what the policy may know of an item; ``classes`` are the queue
        classes accepted."""
        self.policy = policy
        self._traits = traits
        self._max_len = max_len
        self._lanes: dict[Traits, deque[_Entry[T]]] = {}
        self._accepting = frozenset(classes)

    def accept(self, classes: Iterable[str]) -> None:
        """Take tasks of ``classes`` from now on (a new topology); the others already
        queued are still served."""
        self._accepting = frozenset(classes)

    def __len__(self) -> int:
        return sum(len(q) for q in self._lanes.values())

    def __iter__(self) -> Iterator[T]:
        for q in self._lanes.values():
            for entry in q:
                yield entry.item

    def depth(self) -> dict[str, int]:
        """Queued items per queue class (every accepted class, even at zero)."""
        depth = dict.fromkeys(sorted(self._accepting), 0)
        for lane, q in self._lanes.items():
            depth[lane.queue_class] = depth.get(lane.queue_class, 0) + len(q)
        return depth

    def push(
        self,
        item: T,
        now: float,
        first: bool = False,
        admitted: bool = False,
        since: float | None = None,
    ) -> None:
        """Queue ``item`` last in its lane, or ``first``: a task whose run died with its
        agent has waited once already, and should not wait behind younger ones again; or
        where it would be had it been queued ``since`` (a task moved from another queue
        keeps its place). An ``admitted`` item comes back (it waited aside, counted
        already): neither its class nor the bound may refuse it now."""
        lane = self._traits(item)
        if not admitted:
            self._admit(lane)
        entries = self._lanes.setdefault(lane, deque())
        if since is not None:  # a lane is in the order its items were queued
            at = bisect.bisect_right(entries, since, key=lambda e: e.enqueued_at)
            entries.insert(at, _Entry(item, since))
        elif first:
            entries.appendleft(_Entry(item, min(now, entries[0].enqueued_at) if entries else now))
        else:
            entries.append(_Entry(item, now))

    def _admit(self, lane: Traits) -> None:
        if lane.queue_class not in self._accepting:
            raise InvalidTask(f"unknown queue {lane.queue_class!r}")
        if len(self) >= self._max_len:
            raise LimitExceeded("queue full", limit="max_queue_length", max=self._max_len)

    def pop(
        self,
        now: float,
        fits: Callable[[T], bool] = lambda _: True,
        among: Callable[[Traits], bool] = lambda _: True,
    ) -> T | None:
        """The next item by the policy, from the lanes ``among`` allows, if it ``fits``;
        else None and nothing moves.

        A head that does not fit (it needs more GPUs than are free) blocks rather than being
        overtaken, so a large task is not starved by a stream of small ones.
        """
        state = self.policy.snapshot()
        heads = {k: q[0].enqueued_at for k, q in self._lanes.items() if among(k)}
        chosen = self.policy.choose(heads, now)
        if chosen is None:
            return None
        entries = self._lanes[chosen]
        if not fits(entries[0].item):
            self.policy.restore(state)
            return None
        head = entries.popleft()
        if not entries:
            del self._lanes[chosen]
        return head.item

    def order(self, now: float, until: Callable[[T], bool] = lambda _: False) -> list[T]:
        """The queued items in the order ``pop`` would give them now, were nothing to
        arrive (what an expected start is computed from), up to the first one ``until``
        accepts, or all; nothing moves."""
        state = self.policy.snapshot()
        lanes = {lane: deque(q) for lane, q in self._lanes.items()}
        ordered: list[T] = []
        try:
            while lanes:
                chosen = self.policy.choose({k: q[0].enqueued_at for k, q in lanes.items()}, now)
                if chosen is None:
                    break
                ordered.append(item := lanes[chosen].popleft().item)
                if not lanes[chosen]:
                    del lanes[chosen]
                if until(item):
                    break
        finally:
            self.policy.restore(state)
        return ordered

    def since(self, item: T) -> float | None:
        """When ``item`` was enqueued, if it heads its lane (as a blocked item does)."""
        entries = self._lanes.get(self._traits(item))
        return entries[0].enqueued_at if entries and entries[0].item is item else None

    def remove(self, match: Callable[[T], bool]) -> tuple[T, float] | None:
        """Take the first item ``match`` accepts out, with when it was queued."""
        for lane, q in self._lanes.items():
            for entry in q:
                if match(entry.item):
                    q.remove(entry)
                    if not q:
                        del self._lanes[lane]
                    return entry.item, entry.enqueued_at
        return None
