"""The randomness port: where the mesh's random choices come from (retry jitter, gossip
peers). Like the clock (``mesh.core.clock``), a context variable: one process may run
many agents, each drawing from a generator of its own, seeded in a simulation so the
same seed makes the same choices. Outside a simulation, one system-seeded generator."""

from __future__ import annotations

import random
from contextvars import ContextVar, Token

SYSTEM = random.Random()  # seeded by the operating system, once per process
_RNG: ContextVar[random.Random] = ContextVar("mesh_rng", default=SYSTEM)


def use(rng: random.Random) -> Token[random.Random]:
    """Draw from ``rng`` in this context (and the tasks started from it)."""
    return _RNG.set(rng)


def rng() -> random.Random:
    return _RNG.get()
