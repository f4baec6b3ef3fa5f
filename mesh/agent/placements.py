"""The tasks the DC's queue owner took (from the backlog, or from a dead agent) while
they are being placed: each ends by itself, placed, moved on, or failed at its deadline.
Placements under way go on across the owner's terms."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mesh.agent.duties import observed
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.errors import MeshError, StaleWrite, TaskNotFound
from mesh.store.records import TaskStore
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

PLACE_RETRY_S = (0.2, 0.5, 1.0, 2.0)  # placing a claimed task again after etcd trouble


class Placements:
    """The tasks the owner took (from the backlog, or from a dead agent) while they are
    being placed. Each ends by itself: placed (on an agent, another DC, or back in the
    backlog), moved on, or failed at its deadline; ``landed`` hears each end."""

    def __init__(
        self, store: TaskStore, place: Callable[[Job], Awaitable[str]], landed: Callable[[], None]
    ) -> None:
        self._store = store
        self._place = place
        self._landed = landed
        self._tasks: dict[asyncio.Task[None], None] = {}  # in the order started

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def track(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Other work on a taken task that must end by itself (settling a hand-off)."""
        task = observed(asyncio.create_task(work, name=name), "owner placement")
        self._tasks[task] = None
        task.add_done_callback(self._done)

    def spawn(self, job: Job) -> None:
        task = observed(
            asyncio.create_task(self._placed(job), name=f"place {job.task_id}"), "owner placement"
        )
        self._tasks[task] = None
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._landed()  # the view has learnt where it went: look at the backlog again

    async def _placed(self, job: Job) -> None:
        """Place ``job``: on an agent, or back into the backlog with its age kept. etcd
        trouble is retried until the task's deadline, which then fails it: a task taken
        from the backlog is never left without an agent that answers for it."""
        tries = 0
        while job.deadline_ms > now_ms():
            try:
                where = await self._place(job)
                log.info("attempt %d of %s placed on %s", job.attempt, job.task_id, where)
                return
            except (StaleWrite, TaskNotFound) as exc:
                log.info("%s moved on while being placed: %s", job.task_id, exc)
                return
            except MeshError as exc:
                delay = PLACE_RETRY_S[min(tries, len(PLACE_RETRY_S) - 1)]
                tries += 1
                log.warning("placing %s failed (%s); again in %.1fs", job.task_id, exc, delay)
                await asyncio.sleep(delay)
        await self._expire(job)

    async def _expire(self, job: Job) -> None:
        try:
            await self._store.finish(
                job.task_id,
                pb.TASK_STATE_FAILED,
                "DEADLINE_EXCEEDED",
                "deadline passed while waiting to run again",
                attempt=job.attempt,
            )
        except MeshError as exc:
            log.info("could not end %s: %s", job.task_id, exc)
