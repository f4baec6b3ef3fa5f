"""Runs admitted tasks on this agent's GPU slots, one slot per GPU.

It knows nothing of etcd or gRPC: it reports each run's start, progress and end through a
``Reporter``, which the agent backs with the task records. So the executor is driven in
tests with a recording reporter, and a stale record (``started`` returning False) stops a
run before it touches a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from mesh import logs, metrics, tracing
from mesh.agent.duties import observed
from mesh.config import AgentConfig
from mesh.core import classes, eta
from mesh.core.jobs import Job, Outcome, Output
from mesh.core.priority import Policy, Traits
from mesh.core.queue import LaneQueue
from mesh.core.task import state_name
from mesh.errors import (
    InvalidTask,
    LimitExceeded,
    NoCapacity,
    PipelineError,
    QuotaBusy,
    Unavailable,
)
from mesh.gpus import Gpu
from mesh.pipelines import Models, Pipeline, RunContext
from mesh.v1 import tasks_pb2 as pb

Runner = Callable[[Pipeline, RunContext], Awaitable[Output]]

log = logging.getLogger(__name__)


class Reporter(Protocol):
    async def started(self, job: Job, gpus: tuple[Gpu, ...], borrowed: bool) -> bool:
        """Record the run's start (``borrowed``: past its class's share); False: stale."""

    def progress(self, job: Job, step: int, total: int, message: str) -> None: ...

    async def finished(self, job: Job, outcome: Outcome) -> None: ...

    def stopped(self, job: Job, how: str) -> None:
        """The run is over here, however it ended (even unrecorded, when abandoned)."""


@dataclass(slots=True)
class _Run:
    job: Job
    gpus: tuple[Gpu, ...]
    started_at: float
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    handed_back: bool = False
    preempted: bool = False
    recorded: bool = False  # its start is written: only then may it be preempted
    borrowed: bool = False  # it went past its class's share, into the other's idle slots


def _online(lane: Traits) -> bool:
    return lane.task_class == classes.ONLINE


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
        online_share: Callable[[], float] = lambda: classes.DEFAULT_ONLINE_SHARE,
        on_preempted: Callable[[Job], None] = lambda _: None,
        shares: Callable[[], Mapping[str, float]] = dict,
        decided: Callable[..., None] = lambda *_: None,
        runner: Runner = lambda pipeline, ctx: pipeline.run(ctx),
    ) -> None:
        """``on_load`` is called whenever ``running`` or ``queued`` changes. ``quota``
        says why a job must wait for its tenant's quota (None: it may start); a job that
        must waits aside, never blocking others, until ``quota_changed``.
        ``online_share`` is the part of the slots online work is guaranteed; a batch run
        preempted for online work is handed to ``on_preempted`` once it has stopped
        (victims by ``shares``, the tenants' fair-share weights);
        ``decided`` hears each preemption decision with its inputs (the decision log);
        ``runner`` runs a task's pipeline (the agent's may split it over agents by
        layers, ``mesh.agent.stages``)."""
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
        self._online_share = online_share
        self._on_preempted = on_preempted
        self._shares = shares
        self._decided = decided
        self._runner = runner
        self._lent: Counter[str] = Counter()  # GPUs lent to other agents' stages, by class
        self._waiting: dict[str, Job] = {}  # jobs over their tenant's quota, in order
        self._waiting_groups: set[str] = set()  # groups the waiting gauge shows
        self._wake = asyncio.Event()
        self._recheck: asyncio.TimerHandle | None = None
        self.accepting = True

    # -- what routing needs to know -------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running) + self._lent.total()

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

    def check(self, spec: pb.TaskSpec, past_bound: bool = False) -> None:
        """Raise unless this agent could run ``spec`` now (eligible, not draining, room
        left in the queue unless it may go ``past_bound``)."""
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
        if self.queued >= self._cfg.max_queue_length and not past_bound:
            raise LimitExceeded(
                "queue full", limit="max_queue_length", max=self._cfg.max_queue_length
            )

    def by_class(self) -> tuple[dict[str, int], dict[str, int]]:
        """Running and queued tasks per queue class: what gossip tells the DC."""
        running: dict[str, int] = {}
        for run in self._running.values():
            running[run.job.spec.queue] = running.get(run.job.spec.queue, 0) + 1
        for queue, lent in self._lent.items():
            if lent:
                running[queue] = running.get(queue, 0) + lent
        queued = {c: n for c, n in self._queue.depth().items() if n}
        return running, queued

    def free_memory_mb(self) -> tuple[int, ...]:
        return tuple(g.memory_mb for g in self._free)

    def set_priority(self, policy: Policy, classes: list[str]) -> None:
        """Order the queue by ``policy`` from now on, taking tasks of ``classes``."""
        self._queue.policy = policy
        self._queue.accept(classes)

    def enqueue(self, job: Job, past_bound: bool = False) -> None:
        """Queue ``job``; ``past_bound`` even past the queue's bound (``can_reclaim``
        said that borrowed batch runs will give it their GPUs)."""
        self.check(job.spec, past_bound)
        self._queue.push(job, self._clock(), first=job.attempt > 1, admitted=past_bound)
        self._models.demand.arrived(job.spec.model, self._clock())
        self._wake.set()
        self._on_load()

    def can_reclaim(self, spec: pb.TaskSpec) -> bool:
        """Whether an online task would get its GPUs here by preemption, past the online
        work already queued here: batch runs borrowed that many."""
        if classes.task_class(spec) != classes.ONLINE:
            return False
        ahead = sum(j.traits.gpus for j in self._queue if j.traits.task_class == classes.ONLINE)
        need = ahead + max(1, spec.gpu_count)
        share = self._online_share()
        return bool(classes.victims(self._runs(), 0, need, self.slots, share, self._shares()))

    def expected_start_s(self, task_id: str) -> float | None:
        """Seconds until the queued task ``task_id`` is expected to start here (None if
        it is not queued here): ``mesh.core.eta`` over this agent's slots and queue."""
        now = self._clock()
        order = self._queue.order(now, until=lambda job: job.task_id == task_id)
        if not order or order[-1].task_id != task_id:
            return None
        place = len(order) - 1
        estimates = self._queue.policy.estimates
        free_in_s = [0.0] * len(self._free)
        for run in self._running.values():
            left = estimates.expected(run.job.traits.kind) - (now - run.started_at)
            free_in_s += [max(0.0, left)] * len(run.gpus)
        ahead = [(j.traits.gpus, estimates.expected(j.traits.kind)) for j in order[:place]]
        start = eta.expected_start(free_in_s, ahead, order[place].traits.gpus)
        return None if math.isinf(start) else start

    @contextlib.contextmanager
    def lend(self, queue: str) -> Iterator[Gpu]:
        """A free GPU for one stage of a task of ``queue`` another agent runs split by
        layers: taken at once or refused (``NoCapacity``: the sender gives the layers to
        another agent), never queued, so a stage never holds a GPU waiting for another;
        counted in this agent's load, here and in gossip, while held. It goes around the
        queue: the stage belongs to a task that already runs."""
        if not self.accepting or not self._free:
            raise NoCapacity("no free GPU here for a stage")
        gpu = max(self._free, key=lambda g: g.memory_mb)
        self._free.remove(gpu)
        self._lent[queue] += 1
        self._on_load()
        try:
            yield gpu
        finally:
            self._lent[queue] -= 1
            self._free.append(gpu)
            self._wake.set()
            self._on_load()

    # -- the loop ------------------------------------------------------------------------

    def _fitting(self, spec: pb.TaskSpec) -> list[Gpu]:
        return [g for g in self._free if g.memory_mb >= spec.min_gpu_memory_mb]

    def _fits(self, job: Job) -> bool:
        gpus = max(1, job.spec.gpu_count)
        if len(self._fitting(job.spec)) < gpus:
            return False
        if job.spec.no_preempt and classes.task_class(job.spec) == classes.BATCH:
            return classes.batch_may_start(self._runs(), gpus, self.slots, self._online_share())
        return True

    def _runs(self) -> list[classes.Run]:
        return [
            classes.Run(
                run.job.task_id,
                classes.task_class(run.job.spec),
                run.job.traits.tenant,
                len(run.gpus),
                run.started_at,
                self._cfg.queues.get(run.job.spec.queue, 1),
                run.recorded and not run.job.spec.no_preempt and run.cancel_reason is None,
            )
            for run in self._running.values()
        ]

    async def run(self) -> None:
        """Start queued jobs as slots free up, forever; cancel to stop. An online job
        that finds no slot takes back the slots batch borrowed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            blocked = self._start_what_fits()
            if blocked is not None and classes.task_class(blocked.spec) == classes.ONLINE:
                self._reclaim_in_time(blocked)

    def _reclaim_in_time(self, job: Job) -> None:
        """Reclaim for ``job`` once it has waited ``preempt_after_s`` (a slot elsewhere
        may free first: a preempted run is work lost); until then, look again then."""
        since = self._queue.since(job)
        waited = 0.0 if since is None else self._clock() - since
        left = self._cfg.preempt_after_s - waited
        if left <= 0:
            self._reclaim(job)
        elif self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(left, self._look_again)

    def _look_again(self) -> None:
        self._recheck = None
        self._wake.set()

    def _start_what_fits(self) -> Job | None:
        """Start queued jobs while the next one fits; return the one that did not."""
        blocked: list[Job] = []

        def fits(job: Job) -> bool:
            if self._fits(job):
                return True
            blocked.append(job)
            return False

        while True:
            job = self._queue.pop(self._clock(), fits)
            if job is None and blocked and classes.task_class(blocked[-1].spec) == classes.BATCH:
                # a batch head waiting for a slot never holds online work back
                job = self._queue.pop(self._clock(), fits, among=_online)
            if job is None:
                break
            if (reason := self._quota(job)) is not None:
                self._wait(job, reason)
                continue
            gpus = tuple(self._fitting(job.spec)[: max(1, job.spec.gpu_count)])
            borrowed = classes.borrows(
                self._runs(),
                classes.task_class(job.spec),
                len(gpus),
                self.slots,
                self._online_share(),
            )
            for gpu in gpus:
                self._free.remove(gpu)
            run = _Run(job, gpus, self._clock(), borrowed=borrowed)
            self._running[job.task_id] = run
            self._on_load()
            run.task = observed(
                asyncio.create_task(self._execute(run), name=f"task-{job.task_id}"), "run"
            )
            # A task cancelled before its first step never enters its body, nor the
            # ``finally`` there: its GPUs come back when it is done, whatever way.
            run.task.add_done_callback(lambda _, run=run: self._release(run))
        return blocked[-1] if blocked else None

    def _reclaim(self, job: Job) -> None:
        """Preempt the batch runs that borrowed the slots online ``job`` waits for."""
        need = max(1, job.spec.gpu_count)
        freeing = sum(len(r.gpus) for r in self._running.values() if r.preempted)
        free = len(self._fitting(job.spec)) + freeing
        runs, share = self._runs(), self._online_share()
        shares = self._shares()
        chosen = classes.victims(runs, free, need, self.slots, share, shares)
        if chosen:
            self._decided(job.task_id, runs, free, need, self.slots, share, shares, chosen)
        for task_id in chosen:
            run = self._running[task_id]
            log.info("preempting batch task %s for online task %s", task_id, job.task_id)
            run.preempted = run.handed_back = True
            run.cancel_reason = f"preempted by online task {job.task_id}"
            if run.task is not None:
                run.task.cancel()

    def _wait(self, job: Job, reason: str) -> None:
        """Set ``job`` aside until its tenant's quota changes; its record says why."""
        if job.task_id not in self._waiting:
            self._reporter.progress(job, 0, 0, reason)
        self._waiting[job.task_id] = job
        self._count_waiting()

    def _count_waiting(self) -> None:
        counts = Counter(j.spec.user.group or metrics.NO_GROUP for j in self._waiting.values())
        for group in self._waiting_groups - counts.keys():
            metrics.QUOTA_WAITING.labels(group).set(0)
        for group, n in counts.items():
            metrics.QUOTA_WAITING.labels(group).set(n)
        self._waiting_groups = set(counts)

    def quota_changed(self) -> None:
        """A quota slot was given back or the policy changed: the waiting jobs go back to
        the front of the queue, to be judged again."""
        if not self._waiting:
            return
        for job in reversed(self._waiting.values()):
            self._queue.push(job, self._clock(), first=True, admitted=True)
        self._waiting.clear()
        self._count_waiting()
        self._wake.set()

    async def _execute(self, run: _Run) -> None:
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
                self._wait(job, busy.message)
                how = "waiting for quota"
                return
            run.recorded = True
            ctx = RunContext(
                task_id=job.task_id,
                attempt=job.attempt,
                spec=job.spec,
                gpus=run.gpus,
                models=self._models,
                progress=lambda s, t, m: self._reporter.progress(job, s, t, m),
                deadline_ms=job.deadline_ms,
            )
            began = self._clock()
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
                async with asyncio.timeout((job.deadline_ms - _now_ms()) / 1000):
                    output = await self._runner(self._pipelines[job.spec.pipeline], ctx)
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
            group = job.spec.user.group or metrics.NO_GROUP
            spent = len(run.gpus) * (self._clock() - run.started_at)
            metrics.GROUP_GPU_SECONDS.labels(group).inc(max(0.0, spent))
            self._release(run)
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
        elif run.preempted:
            self._on_preempted(job)

    def _release(self, run: _Run) -> None:
        """Give ``run``'s GPUs back, once: it ended, or its task was done without ever
        beginning (cancelled first)."""
        if self._running.get(run.job.task_id) is not run:
            return
        del self._running[run.job.task_id]
        self._free.extend(run.gpus)
        self._wake.set()
        self._on_load()

    # -- cancel and drain ----------------------------------------------------------------

    def cancel(self, task_id: str, reason: str) -> Job | None:
        """Stop a queued or running task here. A queued one is returned for the caller to
        record as cancelled; a running one records its own end when its run unwinds."""
        queued = self._queue.remove(lambda j: j.task_id == task_id) or self._waiting.pop(
            task_id, None
        )
        self._count_waiting()
        if queued is not None:
            self._on_load()
            return queued
        run = self._running.get(task_id)
        if run is not None and run.task is not None and run.cancel_reason is None:
            run.cancel_reason = reason
            run.task.cancel()
        return None

    def withdraw(self, task_id: str) -> None:
        """Take a job this agent has not started out of its queue (or its wait for
        quota); a run already under way is left to its start write, which decides."""
        if self._queue.remove(lambda j: j.task_id == task_id) or self._waiting.pop(task_id, None):
            self._count_waiting()
            self._on_load()

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
        self._count_waiting()
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
