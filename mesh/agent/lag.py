"""How late the event loop runs: the one number that says an agent stalled.

Everything an agent does (answering RPCs, gossip, lease keep-alives) shares one event
loop, so work that hogs it delays all of them at once. A timer due every
``loop_lag_tick_s`` measures how late it fires; the lateness goes to
``gpumesh_event_loop_lag_seconds``.

``collections_paused`` keeps the garbage collector out of a step that makes thousands of
short-lived objects (one per agent of a large DC): collected mid-step, they would be
promoted to the old generation while still alive, and each step's dead ones would soon
set off a full collection of the agent's whole heap, which at 10,000 agents stopped the
loop for about 100 ms every few steps.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from contextlib import contextmanager

from mesh import metrics


@contextmanager
def collections_paused() -> Iterator[None]:
    """No garbage collection while the block runs (its objects die by reference count);
    collection as it was after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def measure_lag(tick_s: float) -> None:
    """Forever: observe how late each tick fires."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        metrics.LOOP_LAG.observe(max(0.0, loop.time() - due))
