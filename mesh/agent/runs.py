"""The runs under way on this agent's slots, from start to end.

A run records its start through the ``Reporter`` before it touches a GPU (a stale record
stops it there), runs its pipeline within the task's deadline, and reports its end; a
run stopped for another reason (cancelled, preempted, handed back, torn down) ends the
way its reason says. Its GPUs come back exactly once, however it ends, even if it is
cancelled before its first step.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from mesh import logs, metrics, tracing
from mesh.agent.duties import observed
from mesh.agent.slots import GpuSlots
from mesh.core import classes, clock
from mesh.core.jobs import Job, Outcome, Output
from mesh.core.preemption import Run
from mesh.core.task import state_name
from mesh.errors import PipelineError, QuotaBusy
from mesh.gpus import Gpu
from mesh.pipelines import Models, Pipeline, RunContext
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

Runner = Callable[[Pipeline, RunContext], Awaitable[Output]]


class Reporter(Protocol):
    async def started(self, job: Job, gpus: tuple[Gpu, ...], borrowed: bool) -> bool:
        """Record the run's start (``borrowed``: past its class's share); False: stale."""

    def progress(self, job: Job, step: int, total: int, message: str) -> None: ...

    async def finished(self, job: Job, outcome: Outcome) -> None: ...

    def stopped(self, job: Job, how: str) -> None:
        """The run is over here, however it ended (even unrecorded, when abandoned)."""


@dataclass(slots=True)
class Running:
    job: Job
    gpus: tuple[Gpu, ...]
    started_at: float
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    handed_back: bool = False
    preempted: bool = False
    recorded: bool = False  # its start is written: only then may it be preempted
    borrowed: bool = False  # it went past its class's share, into the other's idle slots
    cold: bool = False  # its model was not on the agent when it began: it pays the load

    def stop(self, reason: str, handed_back: bool = False) -> None:
        """Cancel the run for ``reason``; ``handed_back``: its task runs again elsewhere
        (the run records no end)."""
        self.cancel_reason = reason
        self.handed_back = self.handed_back or handed_back
        if self.task is not None:
            self.task.cancel()


@dataclass(frozen=True)
class Hooks:
    """What a run tells its executor: ``changed`` (runs or slots changed), ``learn``
    (a kind of task took this long), ``quota_busy`` (the start lost its tenant's quota
    slot: the job waits for the next), ``preempted`` (a preempted run has stopped)."""

    changed: Callable[[], None]
    learn: Callable[[str, float], None]
    quota_busy: Callable[[Job, str], None]
    preempted: Callable[[Job], None]


class Runs:
    def __init__(
        self,
        slots: GpuSlots,
        pipelines: dict[str, Pipeline],
        models: Models,
        reporter: Reporter,
        runner: Runner,
        hooks: Hooks,
        queues: dict[str, int],
        monotonic: Callable[[], float],
    ) -> None:
        self.slots = slots
        self._pipelines = pipelines
        self._models = models
        self._reporter = reporter
        self._runner = runner
        self._hooks = hooks
        self._queues = queues  # the classes' weights: the lower, the sooner preempted
        self.clock = monotonic
        self._running: dict[str, Running] = {}

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._running

    def __iter__(self) -> Iterator[Running]:
        return iter(list(self._running.values()))

    def get(self, task_id: str) -> Running | None:
        return self._running.get(task_id)

    def by_queue(self) -> Counter[str]:
        """Runs per queue class."""
        return Counter(run.job.spec.queue for run in self._running.values())

    def free_in_s(self, took_s: Callable[[Running], float], now: float) -> list[float]:
        """When each GPU the runs hold is expected free, in seconds from ``now``, each
        run lasting ``took_s`` of it."""
        free: list[float] = []
        for run in self._running.values():
            left = took_s(run) - (now - run.started_at)
            free += [max(0.0, left)] * len(run.gpus)
        return free

    def as_preemption_sees(self) -> list[Run]:
        return [
            Run(
                run.job.task_id,
                classes.task_class(run.job.spec),
                run.job.traits.tenant,
                len(run.gpus),
                run.started_at,
                self._queues.get(run.job.spec.queue, 1),
                run.recorded and not run.job.spec.no_preempt and run.cancel_reason is None,
            )
            for run in self._running.values()
        ]

    def start(self, job: Job, gpus: tuple[Gpu, ...], borrowed: bool) -> None:
        self.slots.take(gpus)
        model = job.spec.model
        cold = bool(model) and model not in self._models.present
        run = Running(job, gpus, self.clock(), borrowed=borrowed, cold=cold)
        self._running[job.task_id] = run
        self._hooks.changed()
        run.task = observed(
            asyncio.create_task(self._execute(run), name=f"task-{job.task_id}"), "run"
        )
        # A task cancelled before its first step never enters its body, nor the
        # ``finally`` there: its GPUs come back when it is done, whatever way.
        run.task.add_done_callback(lambda _, run=run: self._release(run))

    async def _execute(self, run: Running) -> None:
        job = run.job
        outcome: Outcome | None = None
        how = "torn-down"
        try:
            try:
                if not await self._reporter.started(job, run.gpus, run.borrowed):
                    log.info(
                        "task %s attempt %d is stale; not running it", job.task_id, job.attempt
                    )
                    how = "stale"
                    return
            except QuotaBusy as busy:  # another agent took the slot first: wait for the next
                self._hooks.quota_busy(job, busy.message)
                how = "waiting for quota"
                return
            run.recorded = True
            outcome = await self._run_pipeline(run)
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
            self._stopped(run, how, outcome)
        if outcome is not None:
            await self._reporter.finished(job, outcome)
        elif run.preempted:
            self._hooks.preempted(job)

    async def _run_pipeline(self, run: Running) -> Outcome:
        job = run.job
        ctx = RunContext(
            task_id=job.task_id,
            attempt=job.attempt,
            spec=job.spec,
            gpus=run.gpus,
            models=self._models,
            progress=lambda s, t, m: self._reporter.progress(job, s, t, m),
            deadline_ms=job.deadline_ms,
        )
        began = self.clock()
        attributes = {
            "task.id": job.task_id,
            "task.attempt": job.attempt,
            "task.pipeline": job.spec.pipeline,
            "task.model": job.spec.model,
            "gpu.slots": [g.index for g in run.gpus],
        }
        with (
            logs.task(job.task_id),
            tracing.TRACER.start_as_current_span(
                "run", context=tracing.joined(job.traceparent), attributes=attributes
            ),
        ):
            async with asyncio.timeout((job.deadline_ms - clock.now_ms()) / 1000):
                output = await self._runner(self._pipelines[job.spec.pipeline], ctx)
        self._hooks.learn(job.traits.kind, self.clock() - began)
        return Outcome(pb.TASK_STATE_SUCCEEDED, output=output)

    def _stopped(self, run: Running, how: str, outcome: Outcome | None) -> None:
        """The run is over here: its GPU time counted, its slots back, its end told."""
        job = run.job
        group = job.spec.user.group or metrics.NO_GROUP
        spent = len(run.gpus) * (self.clock() - run.started_at)
        metrics.GROUP_GPU_SECONDS.labels(group).inc(max(0.0, spent))
        self._release(run)
        if how == "stale":
            return
        if outcome is not None:
            how = state_name(outcome.state)
        elif run.handed_back:
            how = "dropped"
        self._reporter.stopped(job, f"{how}: {run.cancel_reason}" if run.cancel_reason else how)

    def _release(self, run: Running) -> None:
        """Give ``run``'s GPUs back, once: it ended, or its task was done without ever
        beginning (cancelled first)."""
        if self._running.get(run.job.task_id) is not run:
            return
        del self._running[run.job.task_id]
        self.slots.give_back(run.gpus)  # which tells of the change

    async def stop_all(self, reason: str) -> list[Job]:
        """Stop every run for ``reason`` and wait until they have; their jobs, for the
        caller to hand back."""
        stopping = list(self._running.values())
        for run in stopping:
            run.stop(reason, handed_back=True)
        await asyncio.gather(*(r.task for r in stopping if r.task), return_exceptions=True)
        return [r.job for r in stopping]
