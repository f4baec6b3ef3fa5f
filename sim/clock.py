"""An agent's clock in the simulation: the event loop's virtual time, from an epoch, with
the agent's own skew on its wall clock (``mesh.core.clock`` reads it per context)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

EPOCH_S = 1_800_000_000.0  # 2027-01-15: far from any real clock, the same every run


@dataclass
class SimClock:
    skew_s: float = 0.0  # how far this agent's wall clock is off

    def time(self) -> float:
        return EPOCH_S + asyncio.get_running_loop().time() + self.skew_s

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()
