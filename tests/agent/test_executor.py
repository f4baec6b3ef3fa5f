"""The executor on its own: slots, queue order, cancel, deadline, drain, stale starts.

A recording reporter stands where the task records would be, and a gated pipeline lets the
test decide when each run ends, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest
from support import config

from mesh.agent.executor import Executor
from mesh.agent.reclaim import Sharing
from mesh.agent.slots import GpuSlots
from mesh.core.jobs import Job, Outcome, Output
from mesh.core.priority import Weighted
from mesh.core.task import state_name
from mesh.errors import InvalidTask, LimitExceeded, NoCapacity, PipelineError, Unavailable
from mesh.gpus import Gpu, parse_fake
from mesh.pipelines import Models, RunContext
from mesh.pipelines.echo import EchoPipeline
from mesh.pipelines.sleep import SleepPipeline
from mesh.v1 import tasks_pb2 as pb


@dataclass
class Recorder:
    """Reporter that records what the executor tells it."""

    stale: set[str] = field(default_factory=set)
    starts: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    progress_seen: list[tuple[str, int, int]] = field(default_factory=list)
    ends: dict[str, Outcome] = field(default_factory=dict)
    stops: list[tuple[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def started(self, job: Job, gpus: tuple[Gpu, ...], borrowed: bool) -> bool:
        self.starts.append((job.task_id, tuple(g.index for g in gpus)))
        self.changed.set()
        return job.task_id not in self.stale

    def progress(self, job: Job, step: int, total: int, message: str) -> None:
        self.progress_seen.append((job.task_id, step, total))

    async def finished(self, job: Job, outcome: Outcome) -> None:
        self.ends[job.task_id] = outcome
        self.changed.set()

    def stopped(self, job: Job, how: str) -> None:
        self.stops.append((job.task_id, how))

    async def until(self, what: str, ready: Callable[[], object]) -> None:
        try:
            async with asyncio.timeout(10):  # a hang guard, not a measurement
                while not ready():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"executor never reached: {what}") from None


class Gated:
    """A pipeline whose runs end when the test opens their gate."""

    name = "gated"

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.cuda: dict[str, list[int]] = {}

    def open(self, task_id: str) -> None:
        self.gates.setdefault(task_id, asyncio.Event()).set()

    async def run(self, ctx: RunContext) -> Output:
        self.cuda[ctx.task_id] = [g.index for g in ctx.gpus]
        await self.gates.setdefault(ctx.task_id, asyncio.Event()).wait()
        if ctx.spec.params.get("fail"):
            raise PipelineError("asked to fail", "ABORTED")
        if ctx.spec.params.get("crash"):
            raise ZeroDivisionError("bug")
        return Output(ctx.task_id.encode())


def job(
    task_id: str,
    queue: str = "normal",
    gpus: int = 1,
    deadline_s: float = 60,
    model: str = "m",
    **params: str,
) -> Job:
    spec = pb.TaskSpec(task_id=task_id, pipeline="gated", model=model, queue=queue, gpu_count=gpus)
    spec.params.update(params)
    return Job(spec, attempt=1, deadline_ms=int((time.time() + deadline_s) * 1000))


@contextlib.asynccontextmanager
async def running(
    recorder: Recorder | None = None,
    slots: GpuSlots | None = None,
    preloaded: Sequence[str] = (),
    **options: object,
) -> AsyncIterator[tuple[Executor, Recorder, Gated]]:
    """An executor of two GPUs (or ``slots``) with ``preloaded`` models, running its loop
    (``options`` to ``Executor``), stopped and its gates opened after."""
    cfg = config(max_queue_length=4, model_load_s=0)
    recorder, gated = recorder or Recorder(), Gated()
    executor = Executor(
        cfg,
        slots or GpuSlots(parse_fake("2xA100-80GB")),
        {"gated": gated, "echo": EchoPipeline(cfg), "sleep": SleepPipeline(cfg)},
        Models(preloaded, lambda: None),
        recorder,
        Weighted(cfg.queues, cfg.queue_aging_s),
        **options,  # type: ignore[arg-type]
    )
    loop = asyncio.create_task(executor.run())
    try:
        yield executor, recorder, gated
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        for gate in gated.gates.values():
            gate.set()


@pytest.fixture
async def rig() -> AsyncIterator[tuple[Executor, Recorder, Gated]]:
    async with running() as parts:
        yield parts


async def test_one_task_per_gpu_slot_and_the_rest_wait(rig) -> None:
    executor, recorder, gated = rig
    for i in range(3):
        executor.enqueue(job(f"t{i}"))
    await recorder.until("two starts", lambda: len(recorder.starts) == 2)
    assert sorted(gpu for _, gpus in recorder.starts for gpu in gpus) == [0, 1]
    assert executor.running == 2 and executor.queued == 1
    gated.open("t0")
    await recorder.until("third start", lambda: len(recorder.starts) == 3)
    assert recorder.starts[2] == ("t2", tuple(gated.cuda["t0"]))
    assert state_name(recorder.ends["t0"].state) == "SUCCEEDED"
    assert recorder.ends["t0"].output == Output(b"t0")


async def test_multi_gpu_task_gets_both_slots(rig) -> None:
    executor, recorder, _gated = rig
    executor.enqueue(job("wide", gpus=2))
    await recorder.until("start", lambda: recorder.starts)
    assert recorder.starts == [("wide", (0, 1))]
    executor.enqueue(job("waits"))
    assert executor.running == 1 and executor.queued == 1  # no slot left for it


async def test_failures_are_outcomes_not_crashes(rig) -> None:
    executor, recorder, gated = rig
    executor.enqueue(job("fails", fail="1"))
    executor.enqueue(job("crashes", crash="1"))
    gated.open("fails")
    gated.open("crashes")
    await recorder.until("two ends", lambda: len(recorder.ends) == 2)
    assert recorder.ends["fails"].error_code == "ABORTED"
    assert recorder.ends["crashes"].error_code == "INTERNAL"
    assert "ZeroDivisionError" in recorder.ends["crashes"].error_message
    executor.enqueue(job("after"))  # the slots came back
    gated.open("after")
    await recorder.until("third end", lambda: "after" in recorder.ends)


async def test_cancel_running_and_queued(rig) -> None:
    executor, recorder, _gated = rig
    for i in range(3):
        executor.enqueue(job(f"t{i}"))
    await recorder.until("two starts", lambda: len(recorder.starts) == 2)
    queued = executor.cancel("t2", "changed my mind")
    assert queued is not None and queued.task_id == "t2"
    assert executor.cancel("t0", "changed my mind") is None
    await recorder.until("cancelled end", lambda: "t0" in recorder.ends)
    assert state_name(recorder.ends["t0"].state) == "CANCELLED"
    assert recorder.ends["t0"].error_message == "changed my mind"
    assert "t2" not in recorder.ends  # a queued task's end is the caller's to record
    assert executor.holding("t2") is None


async def test_deadline_stops_a_run(rig) -> None:
    executor, recorder, _ = rig
    executor.enqueue(job("late", deadline_s=0.2))
    await recorder.until("end", lambda: "late" in recorder.ends)
    assert state_name(recorder.ends["late"].state) == "FAILED"
    assert recorder.ends["late"].error_code == "DEADLINE_EXCEEDED"


async def test_a_stale_start_never_runs(rig) -> None:
    executor, recorder, gated = rig
    recorder.stale.add("old")
    executor.enqueue(job("old"))
    await recorder.until("start", lambda: recorder.starts)
    await recorder.until("slot back", lambda: executor.running == 0)
    assert "old" not in gated.cuda and "old" not in recorder.ends


async def test_a_run_abandoned_before_it_began_gives_its_slot_back(rig) -> None:
    """Seed 2, owner-stop: an agent woke past its lease, started a run and abandoned it
    in the same turn of the loop. A task cancelled before its first step never enters
    its body, so the body's ``finally`` never gave the GPU back: the agent held a slot
    (and the jobs queued behind it) for good while it stayed a member."""
    executor, recorder, _gated = rig
    executor.enqueue(job("woke"))
    await asyncio.sleep(0)  # the loop's turn: it creates the run's task, not yet begun
    assert executor.running == 1 and not recorder.starts
    dropped = executor.abandon("this agent lost its membership lease")
    assert [j.task_id for j in dropped] == ["woke"]
    executor.enqueue(job("a"))
    executor.enqueue(job("b"))
    await recorder.until("both slots in use", lambda: len(recorder.starts) == 2)
    assert sorted(t for t, _ in recorder.starts) == ["a", "b"]  # "woke" never began


async def test_drain_returns_what_did_not_finish(rig) -> None:
    executor, recorder, gated = rig
    for i in range(3):
        executor.enqueue(job(f"t{i}"))
    await recorder.until("two starts", lambda: len(recorder.starts) == 2)
    gated.open("t0")
    back = await executor.drain(grace_s=0.05)
    assert sorted(j.task_id for j in back) == ["t1", "t2"]
    assert "t1" not in recorder.ends  # handed back, not cancelled
    assert state_name(recorder.ends["t0"].state) == "SUCCEEDED"
    with pytest.raises(Unavailable, match="draining"):
        executor.enqueue(job("late"))


async def test_check_refuses_what_this_agent_cannot_run(rig) -> None:
    executor, recorder, _ = rig
    with pytest.raises(InvalidTask, match="pipeline"):
        executor.check(pb.TaskSpec(pipeline="paint", model="m"))
    with pytest.raises(InvalidTask, match="needs 3 GPU"):
        executor.check(job("x", gpus=3).spec)
    executor.enqueue(job("r0"))
    executor.enqueue(job("r1"))
    await recorder.until("two starts", lambda: len(recorder.starts) == 2)
    for i in range(4):
        executor.enqueue(job(f"q{i}"))
    with pytest.raises(LimitExceeded, match="queue full"):
        executor.enqueue(job("one-too-many"))


async def test_sleep_pipeline_reports_steps_and_cold_start(rig) -> None:
    executor, recorder, _ = rig
    for task_id in ("cold", "warm"):
        j = job(task_id, seconds="0", steps="3")
        j.spec.pipeline = "sleep"
        executor.enqueue(j)
        await recorder.until("end", lambda t=task_id: t in recorder.ends)
    assert [p for p in recorder.progress_seen if p[0] == "cold"] == [
        ("cold", 1, 3),
        ("cold", 2, 3),
        ("cold", 3, 3),
    ]
    assert b'"cold_start": true' in recorder.ends["cold"].output.data
    assert b'"cold_start": false' in recorder.ends["warm"].output.data


async def test_sleep_pipeline_rejects_bad_params(rig) -> None:
    executor, recorder, _ = rig
    j = job("bad", seconds="soon")
    j.spec.pipeline = "sleep"
    executor.enqueue(j)
    await recorder.until("end", lambda: "bad" in recorder.ends)
    assert recorder.ends["bad"].error_code == "INVALID_ARGUMENT"


async def test_online_work_takes_back_the_slots_batch_borrowed() -> None:
    """Two GPUs, half of them online's: two batch runs (one borrowed), then an online
    task. The newest batch run is preempted and handed back; the online task runs."""
    preempted: list[str] = []
    recorder = Recorder()

    def was_preempted(j: Job) -> None:
        preempted.append(j.task_id)
        recorder.changed.set()

    sharing = Sharing(online_share=lambda: 0.5, preempted=was_preempted)
    async with running(recorder, sharing=sharing) as (executor, _, gated):
        executor.enqueue(job("batch-1"))
        await recorder.until("first batch run", lambda: len(recorder.starts) == 1)
        executor.enqueue(job("batch-2"))
        await recorder.until("second batch run", lambda: len(recorder.starts) == 2)
        keeper = job("keeper")
        keeper.spec.no_preempt = True
        executor.enqueue(keeper)  # may not borrow: batch's one slot is taken
        online = job("online")
        online.spec.task_class = pb.TASK_CLASS_ONLINE
        executor.enqueue(online)
        await recorder.until("online run", lambda: any(t == "online" for t, _ in recorder.starts))
        assert preempted == ["batch-2"]
        assert ("batch-2", "dropped: preempted by online task online") in recorder.stops
        assert "batch-2" not in recorder.ends  # not ended: its next attempt runs elsewhere
        assert executor.running == 2 and executor.queued == 1
        gated.open("batch-1")
        await recorder.until("keeper run", lambda: any(t == "keeper" for t, _ in recorder.starts))


async def test_withdraw_takes_a_queued_job_back_and_leaves_a_run_to_its_record(rig) -> None:
    """A placement the record refused: its queued copy goes, and a run whose start is in
    flight is not cancelled (cancelling would write an end over another agent's run)."""
    executor, recorder, gated = rig
    for i in range(3):
        executor.enqueue(job(f"t{i}"))
    await recorder.until("two starts", lambda: len(recorder.starts) == 2)
    executor.withdraw("t2")
    executor.withdraw("t0")
    assert executor.queued == 0 and executor.running == 2
    gated.open("t0")
    await recorder.until("t0 ends", lambda: "t0" in recorder.ends)
    assert state_name(recorder.ends["t0"].state) == "SUCCEEDED"
    assert executor.holding("t2") is None


async def test_a_queued_task_is_told_when_it_should_start() -> None:
    """From the runs' learned times (1 s each, never seen: the default) and the queue's
    order, on a clock the test moves: two slots busy, three tasks queued behind them, the
    model warm."""
    now = [100.0]
    async with running(monotonic=lambda: now[0], preloaded=["m"]) as (executor, recorder, _):
        for i in range(5):
            executor.enqueue(job(f"t{i}"))
            if i == 1:
                await recorder.until("two starts", lambda: len(recorder.starts) == 2)
        now[0] += 0.25  # the runs are a quarter of a second in
        assert executor.expected.start_s("t0") is None  # running, not queued
        starts = [executor.expected.start_s(f"t{i}") for i in (2, 3, 4)]
        assert starts == [0.75, 0.75, 1.75]


async def test_a_cold_model_adds_its_load_to_the_runs_and_tasks_that_pay_it() -> None:
    """Two runs began with their model absent: each holds its GPU a load (1 s, none seen
    yet) more. Of the queue, only the first task of another absent model pays its load."""
    now = [100.0]
    async with running(monotonic=lambda: now[0]) as (executor, recorder, _gated):
        for i in range(2):
            executor.enqueue(job(f"t{i}"))
        await recorder.until("two starts", lambda: len(recorder.starts) == 2)
        executor.enqueue(job("t2"))  # model m: the runs are loading it
        for i in (3, 4):
            executor.enqueue(job(f"t{i}", model="n"))
        now[0] += 0.25
        starts = [executor.expected.start_s(f"t{i}") for i in (2, 3, 4)]
        assert starts == [1.75, 1.75, 2.75]  # t2 ends at 2.75, t3 (loading n) at 3.75


async def test_a_gpu_lent_to_a_stage_is_load_here_and_in_gossip_and_never_queued() -> None:
    slots = GpuSlots(parse_fake("2xA100-80GB"))
    async with running(slots=slots) as (executor, recorder, _gated):
        with slots.lend("batch") as gpu:
            assert executor.running == 1 and executor.by_class() == ({"batch": 1}, {})
            executor.enqueue(job("t0"))
            await recorder.until("start", lambda: recorder.starts)
            assert recorder.starts[0][1] != (gpu.index,)  # the other GPU
            with pytest.raises(NoCapacity), slots.lend("batch"):  # none free: refused at once
                pass
        assert executor.running == 1 and executor.by_class() == ({"normal": 1}, {})
