"""The agent's background work, supervised: nothing ends in silence.

A *kept* duty (a mirror, gossip rounds, the executor loop, the queue owner) runs for the
agent's life. Each run of it is a task of its own, watched by a supervisor task, so the
supervisor tells apart the two ways a duty can end early:

- it raised: the error is logged with its traceback, counted
  (``gpumesh_duty_errors_total{duty}``) and the duty restarts after a back-off;
- it was cancelled although nobody asked it to stop (a ``TaskGroup`` that cancels its
  parent on Python 3.11, a cancelled future it awaited): logged, counted the same way.

Either way the restart is counted (``gpumesh_duty_restarts_total{duty}``), and a duty
that returns on its own is logged. Stopping is explicit: only ``stop()`` (or ``Kept.stop``)
cancels a *supervisor*, and a cancelled supervisor means "stop", never anything else. No
code here reads ``Task.cancelling()``, which a 3.11 ``TaskGroup`` can leave at 1 for a
task that nobody asked to stop.

A *one-shot* duty (republishing a record, settling an unsure submit) is logged and
counted if it fails or is cancelled unasked.
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


def observed(task: asyncio.Task[Any], what: str) -> asyncio.Task[Any]:
    """``task``, whose failure (or cancellation that nobody asked for, as far as the
    task itself can tell: one that ended it while it was not being stopped) is logged
    and counted once it ends: a task made with ``create_task`` outside ``Duties`` that
    raised would otherwise be dropped without a word."""

    def ended(done: asyncio.Task[Any]) -> None:
        if done.cancelled():
            return  # its owner cancels it: the owner knows
        if (error := done.exception()) is not None:
            metrics.DUTY_ERRORS.labels(what).inc()
            log.error("%s %r failed", what, done.get_name(), exc_info=error)

    task.add_done_callback(ended)
    return task


class Kept:
    """A kept duty's handle: ``stop()`` ends it for good (and waits for its end)."""

    def __init__(self, name: str, supervisor: asyncio.Task[None]) -> None:
        self.name = name
        self._supervisor = supervisor
        self.stopping = False

    def done(self) -> bool:
        return self._supervisor.done()

    async def stop(self) -> None:
        self.stopping = True
        self._supervisor.cancel()
        await asyncio.gather(self._supervisor, return_exceptions=True)


class Duties:
    def __init__(self) -> None:
        # In the order started (a dict, not a set): stopping them is the same every run.
        self._tasks: dict[asyncio.Task[None], None] = {}
        self.stopping = False

    def keep(self, name: str, duty: Callable[[], Awaitable[None]]) -> Kept:
        """Run ``duty()`` until it returns, restarting it whenever it raises or is
        cancelled by anything but ``stop``."""
        return Kept(name, self._track(self._supervise(name, duty), name))

    def spawn(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` once; a failure is logged and counted, never lost."""
        return self._track(self._once(name, work), name)

    async def stop(self) -> None:
        self.stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _track(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks[task] = None
        task.add_done_callback(lambda done: self._tasks.pop(done, None))
        return task

    async def _once(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            if not self.stopping:
                metrics.DUTY_ERRORS.labels(name).inc()
                log.error("background work %r was cancelled, though nobody stopped it", name)
            raise
        except Exception:
            metrics.DUTY_ERRORS.labels(name).inc()
            log.exception("background work %r failed", name)

    @staticmethod
    async def _supervise(name: str, duty: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            started = loop.time()
            run = asyncio.ensure_future(duty())
            try:
                await asyncio.wait([run])
            except asyncio.CancelledError:  # only stop() cancels a supervisor
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                raise
            if run.cancelled():
                log.error("duty %r was cancelled, though nobody stopped it", name)
            elif (error := run.exception()) is not None:
                log.error("duty %r failed", name, exc_info=error)
            else:
                log.info("duty %r ended", name)
                return
            metrics.DUTY_ERRORS.labels(name).inc()
            if loop.time() - started > HEALTHY_AFTER_S:
                failures = 0
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            failures += 1
            metrics.DUTY_RESTARTS.labels(name).inc()
            log.warning("restarting duty %r in %.1fs", name, delay)
            await asyncio.sleep(delay)
