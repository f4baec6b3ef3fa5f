"""The agent's supervisor of background duties, with no etcd and no process: a duty that
raises or is cancelled though nobody stopped it is logged, counted and started again;
only ``stop`` ends it, and a 3.11 ``TaskGroup`` that leaves its parent cancelled cannot
end it silently."""

from __future__ import annotations

import asyncio

from support import eventually

from mesh import metrics
from mesh.agent.duties import Duties


def restarts(name: str) -> float:
    return metrics.DUTY_RESTARTS.labels(name)._value.get()


async def test_a_duty_cancelled_from_inside_is_started_again() -> None:
    duties, runs = Duties(), []
    before = restarts("unasked")

    async def duty() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise asyncio.CancelledError  # nobody asked: e.g. a cancelled future it awaited
        await asyncio.Event().wait()

    duties.keep("unasked", duty)
    try:
        await eventually(lambda: len(runs) == 2, what="the duty to run again")
        assert restarts("unasked") == before + 1
    finally:
        await duties.stop()


async def test_a_duty_restarted_after_a_taskgroup_failure_runs_in_a_clean_task() -> None:
    """Python 3.11: a child that fails while the group waits in ``__aexit__`` cancels the
    parent and never uncancels it. A duty that took that for "stopping" ended silently
    (the queue owner did, and kept its election); one restarted in the same task would
    carry the stray cancellation into every later ``TaskGroup`` and ``timeout``."""
    duties, runs, pending = Duties(), [], []

    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("a child of the group fails")

    async def duty() -> None:
        runs.append(len(runs))
        current = asyncio.current_task()
        assert current is not None
        pending.append(current.cancelling())
        if len(runs) == 1:
            async with asyncio.TaskGroup() as group:
                group.create_task(fails())
        await asyncio.Event().wait()

    duties.keep("group", duty)
    try:
        await eventually(lambda: len(runs) == 2, what="the duty to run again")
        assert pending == [0, 0]
    finally:
        await duties.stop()


async def test_a_failing_duty_restarts_and_a_stopped_one_does_not() -> None:
    duties, runs = Duties(), []

    async def duty() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError("a bad moment")
        await asyncio.Event().wait()

    kept = duties.keep("flaky", duty)
    await eventually(lambda: len(runs) == 3, what="two restarts")
    await kept.stop()
    assert kept.done() and len(runs) == 3
    await duties.stop()


async def test_stop_ends_every_duty_and_restarts_none() -> None:
    duties, started = Duties(), asyncio.Event()

    async def duty() -> None:
        started.set()
        await asyncio.Event().wait()

    kept = duties.keep("forever", duty)
    await started.wait()
    before = restarts("forever")
    await duties.stop()
    assert kept.done() and restarts("forever") == before
