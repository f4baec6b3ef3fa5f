"""Retry as a policy object: which errors are worth another try, and how long to wait.

Forwarding and etcd writes share it instead of each growing its own loop. Delays get full
jitter from an injected RNG, so tests can make them deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from mesh.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    delays_s: tuple[float, ...] = (0.1, 0.3, 1.0, 2.0)
    retryable: tuple[type[BaseException], ...] = (Unavailable,)
    final: tuple[type[BaseException], ...] = ()  # end the retries, though retryable
    rng: random.Random = field(default_factory=random.Random)

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call ``attempt`` until it succeeds, fails for good, or the delays run out."""
        for delay in self.delays_s:
            try:
                return await attempt()
            except self.retryable as exc:
                if isinstance(exc, self.final):
                    raise
                wait = delay * (0.5 + self.rng.random() / 2)
                log.debug("retrying in %.2fs after %s", wait, exc)
                await asyncio.sleep(wait)
        return await attempt()


ETCD_WRITE = RetryPolicy()


def patient(
    total_s: float, step_s: float = 2.0, final: tuple[type[BaseException], ...] = ()
) -> RetryPolicy:
    """Retries that outlast an etcd outage of ``total_s``: the start and end of a run
    must be recorded once etcd is back, or the task would be stranded."""
    delays = list(ETCD_WRITE.delays_s)
    while sum(delays) < total_s:
        delays.append(step_s)
    return RetryPolicy(delays_s=tuple(delays), final=final)
