"""The queue discipline: weighted classes with aging, pure and driven by an injected time.

Between non-empty classes it is smooth weighted round-robin (as nginx balances upstreams):
with ``vip: 8, normal: 2`` every 10 pops take 8 vip and 2 normal, evenly interleaved, not
in bursts. Aging bounds the wait: a head that has waited ``aging_s`` goes first, oldest
first, so no class starves however busy a heavier one is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from mesh.errors import InvalidTask, LimitExceeded

T = TypeVar("T")


class Discipline:
    """Which class to serve next: smooth weighted round-robin among the classes that have
    work, except that a head older than ``aging_s`` goes first (the oldest of them). Used
    by each agent's local queue and by the queue owner over the DC's durable backlog."""

    def __init__(self, weights: Mapping[str, int], aging_s: float) -> None:
        self.aging_s = aging_s
        self.reweight(weights)
        self._credit: dict[str, int] = {}

    def reweight(self, weights: Mapping[str, int]) -> None:
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError("weights must be positive")
        self.weights = dict(weights)

    def choose(self, heads: Mapping[str, float], now: float) -> str | None:
        """The class to serve, given when each non-empty class's head was enqueued. A class
        no longer in the weights (a retired one) is served at weight 1 until it is empty."""
        if not heads:
            return None
        aged = [c for c, at in heads.items() if now - at >= self.aging_s]
        if aged:
            return min(aged, key=lambda c: (heads[c], c))
        weight = {c: self.weights.get(c, 1) for c in heads}
        for c, w in weight.items():
            self._credit[c] = self._credit.get(c, 0) + w
        best = max(sorted(heads), key=lambda c: self._credit[c])
        self._credit[best] -= sum(weight.values())
        return best

    def snapshot(self) -> dict[str, int]:
        return dict(self._credit)

    def restore(self, credit: dict[str, int]) -> None:
        self._credit = credit


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    enqueued_at: float


class WeightedQueue(Generic[T]):
    def __init__(self, weights: dict[str, int], max_len: int, aging_s: float) -> None:
        self._discipline = Discipline(weights, aging_s)
        self._max_len = max_len
        self._classes: dict[str, deque[_Entry[T]]] = {c: deque() for c in weights}
        self._accepting = frozenset(weights)

    def reweight(self, weights: dict[str, int]) -> None:
        """Adopt new class weights (a new topology). A class that is gone stops taking
        tasks at once but keeps being served until the tasks it holds are gone."""
        self._discipline.reweight(weights)
        for name in weights:
            self._classes.setdefault(name, deque())
        self._accepting = frozenset(weights)

    def __len__(self) -> int:
        return sum(len(q) for q in self._classes.values())

    def __iter__(self) -> Iterator[T]:
        for q in self._classes.values():
            for entry in q:
                yield entry.item

    def depth(self) -> dict[str, int]:
        return {c: len(q) for c, q in self._classes.items()}

    def push(self, queue_class: str, item: T, now: float, first: bool = False) -> None:
        """Queue ``item`` last in its class, or ``first``: a task whose run died with its
        agent has waited once already, and should not wait behind younger ones again."""
        if queue_class not in self._accepting:
            raise InvalidTask(f"unknown queue {queue_class!r}")
        if len(self) >= self._max_len:
            raise LimitExceeded("queue full", limit="max_queue_length", max=self._max_len)
        entries = self._classes[queue_class]
        if first:
            entries.appendleft(_Entry(item, min(now, entries[0].enqueued_at) if entries else now))
        else:
            entries.append(_Entry(item, now))

    def pop(self, now: float, fits: Callable[[T], bool] = lambda _: True) -> T | None:
        """The next item by weight and age, if it ``fits``; else None and nothing moves.

        A head that does not fit (it needs more GPUs than are free) blocks rather than being
        overtaken, so a large task is not starved by a stream of small ones.
        """
        for name in [c for c, q in self._classes.items() if not q and c not in self._accepting]:
            del self._classes[name]  # a retired class, now empty
        credit = self._discipline.snapshot()
        heads = {c: q[0].enqueued_at for c, q in self._classes.items() if q}
        chosen = self._discipline.choose(heads, now)
        if chosen is None:
            return None
        head = self._classes[chosen][0]
        if not fits(head.item):
            self._discipline.restore(credit)
            return None
        self._classes[chosen].popleft()
        return head.item

    def remove(self, match: Callable[[T], bool]) -> T | None:
        for q in self._classes.values():
            for entry in q:
                if match(entry.item):
                    q.remove(entry)
                    return entry.item
        return None
