"""Runs admitted tasks on this agent's GPU slots, one slot per GPU.

It knows nothing of etcd or gRPC: it reports each run's start, progress and end through a
``Reporter``, which the agent backs with the task records. So the executor is driven in
tests with a recording reporter, and a stale record (``started`` returning False) stops a
run before it touches a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh.config import AgentConfig
from mesh.core.jobs import Job, Outcome
from mesh.core.priority import Policy
from mesh.core.queue import LaneQueue
from mesh.core.task import state_name
from mesh.errors import InvalidTask, LimitExceeded, PipelineError, QuotaBusy, Unavailable
from mesh.gpus import Gpu
from mesh.pipelines import Models, Pipeline, RunContext
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


class Reporter(Protocol):
    async def started(self, job: Job, gpus: tuple[Gpu, ...]) -> bool: ...

    def progress(self, job: Job, step: int, total: int, message: str) -> None: ...

    async def finished(self, job: Job, outcome: Outcome) -> None: ...

    def stopped(self, job: Job, how: str) -> None:
        """The run is over here, however it ended (even unrecorded, when abandoned)."""


@dataclass(slots=True)
class _Run:
    job: Job
    gpus: tuple[Gpu, ...]
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    handed_back: bool = False


def _now_ms() -> int:
    return int(time.time() * 1000)


class Executor:
    def __init__(
        self,
        cfg: AgentConfig,
        gpus: list[Gpu],
        pipelines: dict[str, Pipeline],
        models: Models,
        reporter: Reporter,
        policy: Policy,
        on_load: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        quota: Callable[[Job], str | None] = lambda _: None,
    ) -> None:
        """``on_load`` is called whenever ``running`` or ``queued`` changes. ``quota``
        says why a job must wait for its tenant's quota (None: it may start); a job that
        must waits aside, never blocking others, until ``quota_changed``."""
        self._cfg = cfg
        self._gpus = list(gpus)
        self._free = list(gpus)
        self._pipelines = pipelines
        self._models = models
        self._reporter = reporter
        self._on_load = on_load
        self._clock = clock
        self._queue: LaneQueue[Job] = LaneQueue(
            policy, lambda job: job.traits, cfg.queues, cfg.max_queue_length
        )
        self._running: dict[str, _Run] = {}
        self._quota = quota
        self._waiting: dict[str, Job] = {}  # jobs over their tenant's quota, in order
        self._wake = asyncio.Event()
        self.accepting = True

    # -- what routing needs to know -------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._waiting)

    @property
    def slots(self) -> int:
        return len(self._gpus)

    def holds(self, task_id: str) -> bool:
        return (
            task_id in self._running
            or task_id in self._waiting
            or any(j.task_id == task_id for j in self._queue)
        )

    def depth(self) -> dict[str, int]:
        return self._queue.depth()

    def check(self, spec: pb.TaskSpec) -> None:
        """Raise unless this agent could run ``spec`` now (eligible, not draining, room left)."""
        if not self.accepting:
            raise Unavailable("agent is draining")
        if spec.pipeline not in self._pipelines:
            raise InvalidTask(f"pipeline {spec.pipeline!r} is not on this agent")
        if self._cfg.models and spec.model not in self._cfg.models:
            raise InvalidTask(f"model {spec.model!r} is not served by this agent")
        big_enough = [g for g in self._gpus if g.memory_mb >= spec.min_gpu_memory_mb]
        if len(big_enough) < max(1, spec.gpu_count):
            raise InvalidTask(
                f"needs {max(1, spec.gpu_count)} GPU(s) with >= {spec.min_gpu_memory_mb} MB; "
                f"this agent has {len(big_enough)}"
            )
        if self.queued >= self._cfg.max_queue_length:
            raise LimitExceeded(
                "queue full", limit="max_queue_length", max=self._cfg.max_queue_length
            )

    def by_class(self) -> tuple[dict[str, int], dict[str, int]]:
        """Running and queued tasks per queue class: what gossip tells the DC."""
        running: dict[str, int] = {}
        for run in self._running.values():
            running[run.job.spec.queue] = running.get(run.job.spec.queue, 0) + 1
        queued = {c: n for c, n in self._queue.depth().items() if n}
        return running, queued

    def free_memory_mb(self) -> tuple[int, ...]:
        return tuple(g.memory_mb for g in self._free)

    def set_priority(self, policy: Policy, classes: list[str]) -> None:
        """Order the queue by ``policy`` from now on, taking tasks of ``classes``."""
        self._queue.policy = policy
        self._queue.accept(classes)

    def enqueue(self, job: Job) -> None:
        self.check(job.spec)
        self._queue.push(job, self._clock(), first=job.attempt > 1)
        self._wake.set()
        self._on_load()

    # -- the loop ------------------------------------------------------------------------

    def _fitting(self, spec: pb.TaskSpec) -> list[Gpu]:
        return [g for g in self._free if g.memory_mb >= spec.min_gpu_memory_mb]

    def _fits(self, job: Job) -> bool:
        return len(self._fitting(job.spec)) >= max(1, job.spec.gpu_count)

    async def run(self) -> None:
        """Start queued jobs as slots free up, forever; cancel to stop."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (job := self._queue.pop(self._clock(), self._fits)) is not None:
                if (reason := self._quota(job)) is not None:
                    self._wait(job, reason)
                    continue
                gpus = tuple(self._fitting(job.spec)[: max(1, job.spec.gpu_count)])
                for gpu in gpus:
                    self._free.remove(gpu)
                run = _Run(job, gpus)
                self._running[job.task_id] = run
                self._on_load()
                run.task = asyncio.create_task(self._execute(run), name=f"task-{job.task_id}")

    def _wait(self, job: Job, reason: str) -> None:
        """Set ``job`` aside until its tenant's quota changes; its record says why."""
        if job.task_id not in self._waiting:
            self._reporter.progress(job, 0, 0, reason)
        self._waiting[job.task_id] = job

    def quota_changed(self) -> None:
        """A quota slot was given back or the policy changed: the waiting jobs go back to
        the front of the queue, to be judged again."""
        if not self._waiting:
            return
        for job in reversed(self._waiting.values()):
            self._queue.push(job, self._clock(), first=True)
        self._waiting.clear()
        self._wake.set()

    async def _execute(self, run: _Run) -> None:
        job = run.job
        outcome: Outcome | None = None
        how = "torn-down"
        try:
            try:
                if not await self._reporter.started(job, run.gpus):
                    log.info(
                        "task %s attempt %d is stale; not running it", job.task_id, job.attempt
                    )
                    how = "stale"
                    return
            except QuotaBusy as busy:  # another agent took the slot first: wait for the next
                self._wait(job, busy.message)
                how = "waiting for quota"
                return
            ctx = RunContext(
                task_id=job.task_id,
                attempt=job.attempt,
                spec=job.spec,
                gpus=run.gpus,
                models=self._models,
                progress=lambda s, t, m: self._reporter.progress(job, s, t, m),
            )
            began = self._clock()
            async with asyncio.timeout((job.deadline_ms - _now_ms()) / 1000):
                output = await self._pipelines[job.spec.pipeline].run(ctx)
            outcome = Outcome(pb.TASK_STATE_SUCCEEDED, output=output)
            self._queue.policy.estimates.learn(job.traits.kind, self._clock() - began)
        except TimeoutError:
            outcome = Outcome(
                pb.TASK_STATE_FAILED,
                error_code="DEADLINE_EXCEEDED",
                error_message="task deadline passed while it ran",
            )
        except asyncio.CancelledError:
            if run.cancel_reason is None:
                raise  # the agent is being torn down, not this task cancelled
            if not run.handed_back:
                outcome = Outcome(
                    pb.TASK_STATE_CANCELLED, error_code="CANCELLED", error_message=run.cancel_reason
                )
        except PipelineError as exc:
            outcome = Outcome(pb.TASK_STATE_FAILED, error_code=exc.code, error_message=str(exc))
        except Exception as exc:
            log.exception("pipeline %s crashed on task %s", job.spec.pipeline, job.task_id)
            outcome = Outcome(
                pb.TASK_STATE_FAILED,
                error_code="INTERNAL",
                error_message=f"pipeline crashed: {type(exc).__name__}: {exc}",
            )
        finally:
            self._running.pop(job.task_id, None)
            self._free.extend(run.gpus)
            self._wake.set()
            self._on_load()
            if how != "stale":
                if outcome is not None:
                    how = state_name(outcome.state)
                elif run.handed_back:
                    how = "dropped"
                self._reporter.stopped(
                    job, f"{how}: {run.cancel_reason}" if run.cancel_reason else how
                )
        if outcome is not None:
            await self._reporter.finished(job, outcome)

    # -- cancel and drain ----------------------------------------------------------------

    def cancel(self, task_id: str, reason: str) -> Job | None:
        """Stop a queued or running task here. A queued one is returned for the caller to
        record as cancelled; a running one records its own end when its run unwinds."""
        queued = self._queue.remove(lambda j: j.task_id == task_id) or self._waiting.pop(
            task_id, None
        )
        if queued is not None:
            self._on_load()
            return queued
        run = self._running.get(task_id)
        if run is not None and run.task is not None and run.cancel_reason is None:
            run.cancel_reason = reason
            run.task.cancel()
        return None

    def abandon(self, reason: str) -> list[Job]:
        """Drop every job at once without recording anything, and return them: this agent
        lost its lease, so they must run again elsewhere. Subprocesses are killed."""
        dropped = self._take_queued()
        for run in self._running.values():
            run.handed_back = True
            run.cancel_reason = reason
            dropped.append(run.job)
            if run.task is not None:
                run.task.cancel()
        self._on_load()
        return dropped

    def close_queue(self) -> list[Job]:
        """Stop accepting and give up every queued job, for the caller to hand back now
        rather than after the running ones have had their grace."""
        self.accepting = False
        queued = self._take_queued()
        self._on_load()
        return queued

    def _take_queued(self) -> list[Job]:
        taken = list(self._queue)
        for job in taken:
            self._queue.remove(lambda j, tid=job.task_id: j.task_id == tid)
        taken += self._waiting.values()
        self._waiting.clear()
        return taken

    async def drain(self, grace_s: float) -> list[Job]:
        """Stop accepting, let running tasks finish within ``grace_s``, and return every job
        that did not run to its end (queued, or interrupted) for the caller to hand back."""
        handback = self.close_queue()
        deadline = asyncio.get_running_loop().time() + grace_s
        while running := [r.task for r in self._running.values() if r.task]:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            # asyncio.wait, not gather under a timeout: that would cancel the runs as if
            # they were torn down, and they would be neither finished nor handed back.
            await asyncio.wait(running, timeout=left)
        interrupted = list(self._running.values())
        for run in interrupted:
            run.handed_back = True
            run.cancel_reason = "agent shut down"
            if run.task is not None:
                run.task.cancel()
        tasks = [r.task for r in interrupted if r.task]
        await asyncio.gather(*tasks, return_exceptions=True)
        return handback + [r.job for r in interrupted]
