"""One page of tasks from many DCs. Pure.

Every DC lists its own tasks in task-id order from the same cursor (the last id the
previous page covered), each up to the page size, and says how far it got: ``last`` is
the last id its page covered, or "" when it has nothing more. A DC may stop short of the
page size (it bounds how much it scans for one page), so the merged page may only reach
as far as the least advanced DC that has more: beyond that cursor, that DC's tasks are
not known yet, and the next page takes them up. Merging then loses no task and lists
none twice, whichever DC stops where.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    last: str  # the last id this page covered; "" when nothing is left


def merge(pages: Iterable[Page[T]], limit: int, key: Callable[[T], str]) -> Page[T]:
    """The first ``limit`` tasks of all ``pages`` in id order, and the cursor after them."""
    pages = list(pages)
    pending = [p.last for p in pages if p.last]
    bound = min(pending) if pending else None
    items: Sequence[T] = sorted(
        (item for p in pages for item in p.items if bound is None or key(item) <= bound),
        key=key,
    )
    if len(items) > limit:
        items = items[:limit]
        return Page(list(items), key(items[-1]))
    return Page(list(items), bound or "")
