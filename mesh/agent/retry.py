"""Retry as a policy object: which errors are worth another try, and how long to wait.

Forwarding and etcd writes share it instead of each growing its own loop. Delays get full
jitter from the randomness port (``mesh.core.chance``), or an injected RNG, so tests and
the simulator make them deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from mesh.core import chance
from mesh.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    delays_s: tuple[float, ...] = (0.1, 0.3, 1.0, 2.0)
    retryable: tuple[type[BaseException], ...] = (Unavailable,)
    final: tuple[type[BaseException], ...] = ()  # end the retries, though retryable
    rng: random.Random | None = None  # None: the context's (``chance.rng``)
    lasts_s: float = 0.0  # keep trying (the last delay over) until this long has passed

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call ``attempt`` until it succeeds, fails for good, or the delays run out (and,
        with ``lasts_s``, that much time has passed: jitter never shortens the span)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.lasts_s
        tries = 0
        while tries < len(self.delays_s) or loop.time() < until:
            delay = self.delays_s[min(tries, len(self.delays_s) - 1)]
            tries += 1
            try:
                return await attempt()
            except self.retryable as exc:
                if isinstance(exc, self.final):
                    raise
                wait = delay * (0.5 + (self.rng or chance.rng()).random() / 2)
                log.debug("retrying in %.2fs after %s", wait, exc)
                await asyncio.sleep(wait)
        return await attempt()


ETCD_WRITE = RetryPolicy()


def patient(
    total_s: float, step_s: float = 2.0, final: tuple[type[BaseException], ...] = ()
) -> RetryPolicy:
    """Retries that outlast an etcd outage of ``total_s``: the start and end of a run
    must be recorded once etcd is back, or the task would be stranded (its record saying
    it runs on an agent that lives, and so is never re-queued). The span is kept in time,
    not in a count of tries whose jittered delays could add up to half of it."""
    delays = (*ETCD_WRITE.delays_s, step_s)
    return RetryPolicy(delays_s=delays, final=final, lasts_s=total_s)
