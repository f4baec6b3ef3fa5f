"""The clock port: wall time as the mesh records it (milliseconds since the epoch, and
protobuf timestamps) and a monotonic clock for intervals.

Every agent module reads time here, never from ``time`` directly, so that one process
can run many agents on one virtual clock, each with its own skew (the simulator sets a
``Clock`` for an agent's tasks with ``use``: the setting is a context variable, which each
task an agent starts inherits). Timers are the event loop's: a loop with virtual time
moves them. Decisions that must be replayed take the time as an argument instead.
"""

from __future__ import annotations

import time as _time
from contextvars import ContextVar, Token
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals only)."""


class SystemClock:
    def time(self) -> float:
        return _time.time()

    def monotonic(self) -> float:
        return _time.monotonic()


SYSTEM = SystemClock()  # holds no state: one for every context
_CLOCK: ContextVar[Clock] = ContextVar("mesh_clock", default=SYSTEM)


def use(clock: Clock) -> Token[Clock]:
    """Read time from ``clock`` in this context (and the tasks started from it)."""
    return _CLOCK.set(clock)


def now() -> float:
    return _CLOCK.get().time()


def now_ms() -> int:
    return int(_CLOCK.get().time() * 1000)


def monotonic() -> float:
    return _CLOCK.get().monotonic()


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(_CLOCK.get().time() * 1e9))
    return ts
