"""The agent's background work, supervised: nothing fails in silence.

A *kept* duty (a mirror, gossip rounds, the executor loop, the queue owner) runs for the
agent's life: if it raises, the error is logged with its traceback, counted
(``gpumesh_duty_errors_total{duty}``) and the duty is started again after a back-off, so
one bug or one bad moment of etcd does not quietly leave the agent without its
membership view or its backlog dispatch. A *one-shot* duty (republishing a record,
settling an unsure submit) is logged and counted if it fails. ``stop`` cancels them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mesh import metrics

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
HEALTHY_AFTER_S = 30.0  # a duty that ran this long before failing starts its back-off anew


class Duties:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def keep(self, name: str, duty: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``duty()`` until it returns, restarting it whenever it raises. Cancel the
        returned task to stop it."""
        return self._track(self._supervise(name, duty), name)

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` once; a failure is logged and counted, never lost."""
        return self._track(self._once(name, work), name)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _track(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _once(name: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            metrics.DUTY_ERRORS.labels(name).inc()
            log.exception("background work %r failed", name)

    @staticmethod
    async def _supervise(name: str, duty: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            try:
                await duty()
                return
            except Exception:
                metrics.DUTY_ERRORS.labels(name).inc()
                if loop.time() - started > HEALTHY_AFTER_S:
                    failures = 0
                delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
                failures += 1
                log.exception("duty %r failed; restarting in %.1fs", name, delay)
                await asyncio.sleep(delay)
