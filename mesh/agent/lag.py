"""How late the event loop runs: the one number that says an agent stalled.

Everything an agent does (answering RPCs, gossip, lease keep-alives) shares one event
loop, so work that hogs it delays all of them at once. A timer due every
``loop_lag_tick_s`` measures how late it fires; the lateness goes to
``gpumesh_event_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio

from mesh import metrics


async def measure_lag(tick_s: float) -> None:
    """Forever: observe how late each tick fires."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + tick_s
        await asyncio.sleep(tick_s)
        metrics.LOOP_LAG.observe(max(0.0, loop.time() - due))
