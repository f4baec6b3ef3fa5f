"""The queue discipline: weighted classes with aging, pure and driven by an injected time.

Between non-empty classes it is smooth weighted round-robin (as nginx balances upstreams):
with ``vip: 8, normal: 2`` every 10 pops take 8 vip and 2 normal, evenly interleaved, not
in bursts. Aging bounds the wait: a head that has waited ``aging_s`` goes first, oldest
first, so no class starves however busy a heavier one is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from mesh.errors import InvalidTask, LimitExceeded

T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    item: T
    enqueued_at: float


class WeightedQueue(Generic[T]):
    def __init__(self, weights: dict[str, int], max_len: int, aging_s: float) -> None:
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError("weights must be positive")
        self._weights = dict(weights)
        self._max_len = max_len
        self._aging_s = aging_s
        self._classes: dict[str, deque[_Entry[T]]] = {c: deque() for c in weights}
        self._credit: dict[str, int] = dict.fromkeys(weights, 0)
        self._accepting = frozenset(weights)

    def reweight(self, weights: dict[str, int]) -> None:
        """Adopt new class weights (a new topology). A class that is gone stops taking
        tasks at once but keeps its old weight until the tasks it holds are served."""
        if not weights or any(w <= 0 for w in weights.values()):
            raise ValueError("weights must be positive")
        for name in list(self._classes):
            if name not in weights and not self._classes[name]:
                del self._classes[name], self._credit[name], self._weights[name]
        for name, weight in weights.items():
            self._classes.setdefault(name, deque())
            self._credit.setdefault(name, 0)
            self._weights[name] = weight
        self._accepting = frozenset(weights)

    def __len__(self) -> int:
        return sum(len(q) for q in self._classes.values())

    def __iter__(self) -> Iterator[T]:
        for q in self._classes.values():
            for entry in q:
                yield entry.item

    def depth(self) -> dict[str, int]:
        return {c: len(q) for c, q in self._classes.items()}

    def oldest_wait(self, now: float) -> dict[str, float]:
        return {c: (now - q[0].enqueued_at) if q else 0.0 for c, q in self._classes.items()}

    def push(self, queue_class: str, item: T, now: float) -> None:
        if queue_class not in self._accepting:
            raise InvalidTask(f"unknown queue {queue_class!r}")
        if len(self) >= self._max_len:
            raise LimitExceeded("queue full", limit="max_queue_length", max=self._max_len)
        self._classes[queue_class].append(_Entry(item, now))

    def _choose(self, now: float) -> str | None:
        self._forget_drained()
        waiting = [c for c, q in self._classes.items() if q]
        if not waiting:
            return None
        aged = [c for c in waiting if now - self._classes[c][0].enqueued_at >= self._aging_s]
        if aged:
            return min(aged, key=lambda c: self._classes[c][0].enqueued_at)
        total = sum(self._weights[c] for c in waiting)
        for c in waiting:
            self._credit[c] += self._weights[c]
        best = max(waiting, key=lambda c: self._credit[c])
        self._credit[best] -= total
        return best

    def _forget_drained(self) -> None:
        for name in [c for c, q in self._classes.items() if not q and c not in self._accepting]:
            del self._classes[name], self._credit[name], self._weights[name]

    def pop(self, now: float, fits: Callable[[T], bool] = lambda _: True) -> T | None:
        """The next item by weight and age, if it ``fits``; else None and nothing moves.

        A head that does not fit (it needs more GPUs than are free) blocks rather than being
        overtaken, so a large task is not starved by a stream of small ones.
        """
        credit = dict(self._credit)
        chosen = self._choose(now)
        if chosen is None:
            return None
        head = self._classes[chosen][0]
        if not fits(head.item):
            self._credit = credit
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
