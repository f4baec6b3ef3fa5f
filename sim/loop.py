"""An asyncio event loop on virtual time: when nothing is ready to run, the clock jumps
to the next timer instead of waiting for it.

A simulated mesh does no I/O (its network and its etcd are in memory), so the loop's
selector never has anything to wait for: asked to wait ``timeout`` seconds, it moves the
clock on by exactly that and returns at once. An hour of lease expiries and retries takes
the CPU time its callbacks take. Asked to wait with no timeout at all, every task is
waiting for something no timer will bring: the simulation is stuck, and ``Stuck`` says
so rather than hanging. No threads (``asyncio.to_thread`` would finish behind the loop's
back), no wall clock: the same program runs the same way every time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class Stuck(RuntimeError):
    """Every task waits and no timer is set: nothing can ever happen again."""


class _NoIo(selectors.BaseSelector):
    """A selector over no I/O that moves ``loop``'s virtual clock instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self._map: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Stuck("every task waits and no timer is set")
        self.now += max(0.0, timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual = _NoIo()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on a fresh virtual loop, and close the loop."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
