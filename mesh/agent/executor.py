"""Runs admitted tasks on this agent's GPU slots: the queue, admission, and which job
starts when.

It knows nothing of etcd or gRPC: each run reports its start, progress and end through a
``Reporter`` (``mesh.agent.runs``), which the agent backs with the task records. So the
executor is driven in tests with a recording reporter, and a stale record (``started``
returning False) stops a run before it touches a GPU. Its neighbours each hold one
concern: the slots and their lending (``slots``), the runs under way (``runs``), tenant
quota (``gate``), which batch runs give way to online work (``mesh.core.preemption``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from mesh.agent.expected import Expected
from mesh.agent.gate import QuotaGate
from mesh.agent.reclaim import Reclaimer, Sharing
from mesh.agent.runs import Hooks, Reporter, Runner, Runs
from mesh.agent.slots import GpuSlots
from mesh.config import AgentConfig
from mesh.core import classes, clock, preemption
from mesh.core.jobs import Job
from mesh.core.priority import Policy, Traits
from mesh.core.queue import LaneQueue
from mesh.errors import InvalidTask, LimitExceeded, Unavailable
from mesh.pipelines import Models, Pipeline
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


def _online(lane: Traits) -> bool:
    return lane.task_class == classes.ONLINE


class Executor:
    def __init__(
        self,
        cfg: AgentConfig,
        slots: GpuSlots,
        pipelines: dict[str, Pipeline],
        models: Models,
        reporter: Reporter,
        policy: Policy,
        *,
        on_load: Callable[[], None] = lambda: None,
        monotonic: Callable[[], float] = clock.monotonic,
        gate: QuotaGate | None = None,
        sharing: Sharing | None = None,
        runner: Runner = lambda pipeline, ctx: pipeline.run(ctx),
    ) -> None:
        """``on_load`` is called whenever ``running`` or ``queued`` changes. A job its
        tenant's quota holds back (``gate``) waits aside, never blocking others, until
        ``quota_changed``. ``runner`` runs a task's pipeline (the agent's may split it
        over agents by layers, ``mesh.agent.stages``)."""
        self._cfg = cfg
        self._slots = slots
        self._pipelines = pipelines
        self._models = models
        self._reporter = reporter
        self._on_load = on_load
        self._clock = monotonic
        self._gate = gate if gate is not None else QuotaGate()  # none: any task may start
        self._sharing = sharing = sharing or Sharing()
        self._queue: LaneQueue[Job] = LaneQueue(
            policy, lambda job: job.traits, cfg.queues, cfg.max_queue_length
        )
        learn = lambda kind, s: self._queue.policy.estimates.learn(kind, s)  # noqa: E731
        hooks = Hooks(on_load, learn, self._hold, sharing.preempted)
        self._runs = Runs(slots, pipelines, models, reporter, runner, hooks, cfg.queues, monotonic)
        self._wake = asyncio.Event()
        since, wake = self._queue.since, self._wake.set
        self._reclaimer = Reclaimer(cfg.preempt_after_s, self._runs, sharing, since, wake)
        slots.freed.connect(self._wake.set)
        self.expected = Expected(self._queue, slots, self._runs, pipelines, models, monotonic)

    # -- what routing needs to know -------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._slots.accepting

    @property
    def running(self) -> int:
        return len(self._runs) + self._slots.lent.total()

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._gate)

    @property
    def slots(self) -> int:
        return len(self._slots)

    def holding(self, task_id: str) -> Job | None:
        """The job of ``task_id`` this agent holds: running, queued or held for quota."""
        if (run := self._runs.get(task_id)) is not None:
            return run.job
        queued = next((j for j in self._queue if j.task_id == task_id), None)
        return queued or self._gate.get(task_id)

    def check(self, spec: pb.TaskSpec, past_bound: bool = False) -> None:
        """Raise unless this agent could run ``spec`` now (eligible, not draining, room
        left in the queue unless it may go ``past_bound``)."""
        if not self.accepting:
            raise Unavailable("agent is draining")
        check_eligible(spec, self._cfg.models, self._pipelines, self._slots.big_enough(spec))
        if self.queued >= self._cfg.max_queue_length and not past_bound:
            raise LimitExceeded(
                "queue full", limit="max_queue_length", max=self._cfg.max_queue_length
            )

    def by_class(self) -> tuple[dict[str, int], dict[str, int]]:
        """Running and queued tasks per queue class: what gossip tells the DC."""
        running = self._runs.by_queue() + self._slots.lent
        queued = {c: n for c, n in self._queue.depth().items() if n}
        return dict(running), queued

    def free_memory_mb(self) -> tuple[int, ...]:
        return self._slots.free_memory_mb()

    def set_priority(self, policy: Policy, classes: list[str]) -> None:
        """Order the queue by ``policy`` from now on, taking tasks of ``classes``."""
        self._queue.policy = policy
        self._queue.accept(classes)

    def enqueue(self, job: Job, past_bound: bool = False) -> None:
        """Queue ``job``; ``past_bound`` even past the queue's bound (``can_reclaim``
        said that borrowed batch runs will give it their GPUs)."""
        self.check(job.spec, past_bound)
        now = self._clock()
        since = now - job.waited_s if job.waited_s else None  # moved here: its place kept
        self._queue.push(job, now, first=job.attempt > 1, admitted=past_bound, since=since)
        job.waited_s = 0.0
        self._models.demand.arrived(job.spec.model, self._clock())
        self._wake.set()
        self._on_load()

    def can_reclaim(self, spec: pb.TaskSpec) -> bool:
        """Whether an online task would get its GPUs here by preemption, past the online
        work already queued here: batch runs borrowed that many."""
        if classes.task_class(spec) != classes.ONLINE:
            return False
        ahead = sum(j.traits.gpus for j in self._queue if j.traits.task_class == classes.ONLINE)
        return self._reclaimer.could(spec, ahead)

    # -- the loop ------------------------------------------------------------------------

    def _fits(self, job: Job) -> bool:
        gpus = max(1, job.spec.gpu_count)
        if len(self._slots.fitting(job.spec)) < gpus:
            return False
        if job.spec.no_preempt and classes.task_class(job.spec) == classes.BATCH:
            runs, share = self._runs.as_preemption_sees(), self._sharing.online_share()
            return preemption.batch_may_start(runs, gpus, self.slots, share)
        return True

    async def run(self) -> None:
        """Start queued jobs as slots free up, forever; cancel to stop. An online job
        that finds no slot takes back the slots batch borrowed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            blocked = self._start_what_fits()
            if blocked is not None and classes.task_class(blocked.spec) == classes.ONLINE:
                self._reclaimer.in_time(blocked)

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
            if (reason := self._gate.verdict(job)) is not None:
                self._hold(job, reason)
                continue
            gpus = tuple(self._slots.fitting(job.spec)[: max(1, job.spec.gpu_count)])
            borrowed = preemption.borrows(
                self._runs.as_preemption_sees(),
                classes.task_class(job.spec),
                len(gpus),
                self.slots,
                self._sharing.online_share(),
            )
            self._runs.start(job, gpus, borrowed)
        return blocked[-1] if blocked else None

    def _hold(self, job: Job, reason: str) -> None:
        """Set ``job`` aside until its tenant's quota changes; its record says why."""
        if self._gate.hold(job):
            self._reporter.progress(job, 0, 0, reason)

    def quota_changed(self) -> None:
        """A quota slot was given back or the policy changed: the waiting jobs go back to
        the front of the queue, to be judged again."""
        released = self._gate.release()
        if not released:
            return
        for job in reversed(released):
            self._queue.push(job, self._clock(), first=True, admitted=True)
        self._wake.set()

    # -- cancel and drain ----------------------------------------------------------------

    def _unqueue(self, task_id: str) -> Job | None:
        """Take a job that has not started out of the queue (with how long it waited
        there, ``Job.waited_s``, should it queue elsewhere) or its wait for quota."""
        if (taken := self._queue.remove(lambda j: j.task_id == task_id)) is None:
            return self._gate.withdraw(task_id)
        job, since = taken
        job.waited_s = max(0.0, self._clock() - since)
        return job

    def cancel(self, task_id: str, reason: str) -> Job | None:
        """Stop a queued or running task here. A queued one is returned for the caller to
        record as cancelled; a running one records its own end when its run unwinds."""
        queued = self._unqueue(task_id)
        if queued is not None:
            self._on_load()
            return queued
        run = self._runs.get(task_id)
        if run is not None and run.task is not None and run.cancel_reason is None:
            run.stop(reason)
        return None

    def withdraw(self, task_id: str) -> bool:
        """Take a job not yet started out of the queue (or its wait for quota): True if so."""
        if self._unqueue(task_id) is None:
            return False
        self._on_load()
        return True

    def abandon(self, reason: str) -> list[Job]:
        """Drop every job at once without recording anything, and return them: this agent
        lost its lease, so they must run again elsewhere. Subprocesses are killed."""
        dropped = self._take_queued()
        for run in self._runs:
            run.stop(reason, handed_back=True)
            dropped.append(run.job)
        self._on_load()
        return dropped

    def close_queue(self) -> list[Job]:
        """Stop accepting and give up every queued job, for the caller to hand back now
        rather than after the running ones have had their grace."""
        self._slots.accepting = False
        queued = self._take_queued()
        self._on_load()
        return queued

    def _take_queued(self) -> list[Job]:
        taken = [self._unqueue(job.task_id) for job in list(self._queue)]
        return [job for job in taken if job is not None] + self._gate.release()

    async def drain(self, grace_s: float) -> list[Job]:
        """Stop accepting, let running tasks finish within ``grace_s``, and return every job
        that did not run to its end (queued, or interrupted) for the caller to hand back."""
        handback = self.close_queue()
        deadline = asyncio.get_running_loop().time() + grace_s
        while running := [r.task for r in self._runs if r.task]:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            # asyncio.wait, not gather under a timeout: that would cancel the runs as if
            # they were torn down, and they would be neither finished nor handed back.
            await asyncio.wait(running, timeout=left)
        return handback + await self._runs.stop_all("agent shut down")


def check_eligible(
    spec: pb.TaskSpec, models: Sequence[str], pipelines: Mapping[str, Pipeline], big_enough: int
) -> None:
    """Raise unless an agent of ``models`` (empty: any), ``pipelines`` and ``big_enough``
    GPUs with the memory ``spec`` asks could ever run it."""
    if spec.pipeline not in pipelines:
        raise InvalidTask(f"pipeline {spec.pipeline!r} is not on this agent")
    if models and spec.model not in models:
        raise InvalidTask(f"model {spec.model!r} is not served by this agent")
    if big_enough < max(1, spec.gpu_count):
        raise InvalidTask(
            f"needs {max(1, spec.gpu_count)} GPU(s) with >= {spec.min_gpu_memory_mb} MB; "
            f"this agent has {big_enough}"
        )
