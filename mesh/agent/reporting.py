"""The executor's reports, written into the task records: the agent's side of a run.

Every write is fenced by the run's attempt, and the running marker rides on the agent's
lease, so a run whose record has moved on can neither start nor overwrite its end.
Progress is throttled per task (``progress_interval_s``): etcd sees at most a few writes
a second per task however chatty a pipeline is, and the last step is never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from mesh import metrics, tracing
from mesh.agent.duties import observed
from mesh.agent.history import History
from mesh.agent.retry import patient
from mesh.agent.runquota import RunQuota
from mesh.config import AgentConfig
from mesh.core import clock
from mesh.core.clock import now_ts
from mesh.core.jobs import Job, Outcome
from mesh.core.lifecycle import claim_run, end
from mesh.core.task import TERMINAL, state_name
from mesh.core.task import media_type as checked_media_type
from mesh.errors import MeshError, QuotaBusy, StaleWrite
from mesh.gpus import Gpu
from mesh.store.quota import QuotaStore
from mesh.store.records import Mutation, Stored, TaskStore
from mesh.trust.pki import private_dir
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


class RecordReporter:
    def __init__(
        self,
        cfg: AgentConfig,
        store: TaskStore,
        lease: Callable[[], int],
        history: History,
        quota: QuotaStore | None = None,
    ) -> None:
        """``quota``: a capped tenant's task takes its GPUs' quota slots in its start
        write and gives them back in its end write."""
        self._cfg = cfg
        self._store = store
        self._lease = lease
        self._history = history
        self._quota = RunQuota(cfg.agent_id, store, lease, quota)
        # A run's start and end wait out an etcd outage as long as its lease may live.
        self._retry = patient(cfg.lease_ttl_s + cfg.etcd_outage_grace_s)
        self._progress: dict[str, pb.Progress] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}

    async def started(self, job: Job, gpus: tuple[Gpu, ...], borrowed: bool) -> bool:
        cancelled = False
        waited: list[tuple[int, int]] = []  # the queue wait the written record shows (ns)

        def mutate(record: peer_pb2.TaskRecord) -> None:
            nonlocal cancelled
            status = record.status
            claim_run(record, self._cfg.agent_id)
            status.dc = self._cfg.dc
            # The accepting write may land after this one, or, for a short task, never
            # (the run has ended first): the run states how it got here itself.
            del status.path[:]
            status.path.extend(job.path)
            if record.cancel_requested:
                cancelled = True
                end(status, pb.TASK_STATE_CANCELLED, "CANCELLED", "cancelled before start")
                return
            status.state = pb.TASK_STATE_RUNNING
            status.started_at.CopyFrom(now_ts())
            since = status.queued_at if status.HasField("queued_at") else status.created_at
            waited.append((since.ToNanoseconds(), status.started_at.ToNanoseconds()))
            status.progress.CopyFrom(
                pb.Progress(
                    step=0, total=0, message=f"on GPUs {','.join(str(g.index) for g in gpus)}"
                )
            )

        compares, puts, slots = self._quota.claim(job, borrowed)
        stored = await self._write(job, mutate, "start", fence=compares, also=puts)
        if stored is None or cancelled:
            if stored is not None and slots.names:
                await self._quota.give_back(slots)
            return False
        self._quota.started(job, slots, len(gpus))
        if waited:
            _waited(job, *waited[-1])
        user = job.spec.user
        self._history.write(
            "run",
            "start",
            task=job.task_id,
            attempt=job.attempt,
            rev=stored.revision,
            user=user.id,
            group=user.group,
            gpus=len(gpus),
        )
        return True

    def stopped(self, job: Job, how: str) -> None:
        self._history.write("run", "end", task=job.task_id, attempt=job.attempt, how=how)
        self._quota.stopped(job, how)

    def progress(self, job: Job, step: int, total: int, message: str) -> None:
        self._progress[job.task_id] = pb.Progress(step=step, total=total, message=message)
        if job.task_id not in self._flushers:
            self._flushers[job.task_id] = observed(
                asyncio.create_task(self._flush(job)), "progress"
            )

    async def _flush(self, job: Job) -> None:
        try:
            while (progress := self._progress.pop(job.task_id, None)) is not None:
                started = clock.monotonic()

                def mutate(record: peer_pb2.TaskRecord, p: pb.Progress = progress) -> None:
                    record.status.progress.CopyFrom(p)

                try:
                    await self._store.update(job.task_id, mutate, attempt=job.attempt)
                except MeshError as exc:
                    log.debug("progress of %s not written: %s", job.task_id, exc)
                    return
                wait = self._cfg.progress_interval_s - (clock.monotonic() - started)
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            self._flushers.pop(job.task_id, None)

    def _kept(self, job: Job, status: pb.TaskStatus, task_s: float) -> None:
        """A failed or slow task's trace is kept whatever its sampling said."""
        failed = status.state != pb.TASK_STATE_SUCCEEDED
        if failed or task_s > self._cfg.trace_slow_s:
            attributes: dict[str, str | int | float] = {
                "task.id": job.task_id,
                "task.attempt": job.attempt,
                "task.state": state_name(status.state),
                "task.kept": "failed" if failed else "slow",
            }
            if status.error.code:
                attributes["error.code"] = status.error.code
            start_ns, end_ns = status.created_at.ToNanoseconds(), status.finished_at.ToNanoseconds()
            tracing.keep_task(job.traceparent, start_ns, end_ns, attributes)

    def _result(self, job: Job, outcome: Outcome) -> pb.Result | None:
        if outcome.output is None:
            return None
        data, media_type = outcome.output.data, checked_media_type(outcome.output.media_type)
        if len(data) <= self._cfg.inline_result_bytes:
            return pb.Result(inline=data, media_type=media_type)
        path = write_result(Path(self._cfg.result_dir), job.task_id, job.attempt, data)
        return pb.Result(uri=path.as_uri(), media_type=media_type)

    async def finished(self, job: Job, outcome: Outcome) -> None:
        flusher = self._flushers.pop(job.task_id, None)
        if flusher is not None:
            flusher.cancel()
        self._progress.pop(job.task_id, None)
        result = self._result(job, outcome)

        def mutate(record: peer_pb2.TaskRecord) -> None:
            status = record.status
            if record.cancel_requested and outcome.state == pb.TASK_STATE_SUCCEEDED:
                # The cancel was recorded while this ran, and its caller was told the
                # task had not ended: it must not end as a success now.
                why = record.cancel_reason or "cancelled by user"
                end(status, pb.TASK_STATE_CANCELLED, "CANCELLED", f"{why} (while it ran)")
                return
            status.state = outcome.state
            status.finished_at.CopyFrom(now_ts())
            if result is not None:
                status.result.CopyFrom(result)
            if outcome.error_code:
                status.error.code = outcome.error_code
                status.error.message = outcome.error_message[:4096]
            if outcome.state == pb.TASK_STATE_SUCCEEDED and status.progress.total:
                status.progress.step = status.progress.total

        metrics.FINISHED.labels(state_name(outcome.state)).inc()
        slots, spent = self._quota.ending(job)
        stored = await self._write(job, mutate, "end", also=[*self._quota.freeing(slots), *spent])
        if stored is None:
            stored = await self._landed(job)
        if stored is None and (slots.names or spent):
            await self._quota.give_back(slots, spent)
        if stored is not None:
            status = stored.status
            trace_id = status.trace_id
            ended_ns = status.finished_at.ToNanoseconds()
            if status.HasField("started_at"):
                run_s = (ended_ns - status.started_at.ToNanoseconds()) / 1e9
                metrics.observe(metrics.RUN_SECONDS.labels(job.spec.pipeline), run_s, trace_id)
            task_s = (ended_ns - status.created_at.ToNanoseconds()) / 1e9
            metrics.observe(metrics.TASK_SECONDS, task_s, trace_id)
            self._kept(job, status, task_s)
        self._history.write(
            "commit",
            "rejected" if stored is None else "ok",
            task=job.task_id,
            attempt=job.attempt,
            state=state_name(outcome.state),
            rev=stored.revision if stored else None,
        )

    async def _landed(self, job: Job) -> Stored | None:
        """The record, if it shows this run's end after all: an end write that timed out
        (etcd lost its quorum under it) may have been applied, and its retry then finds
        the task "already finished", by this very run."""
        try:
            stored = await self._store.get(job.task_id)
        except MeshError:
            return None
        status = stored.status
        ours = status.attempt == job.attempt and status.agent == self._cfg.agent_id
        return stored if ours and status.state in TERMINAL else None

    async def _write(
        self,
        job: Job,
        mutate: Mutation,
        what: str,
        fence: Sequence[object] = (),
        also: Sequence[object] = (),
    ) -> Stored | None:
        """A fenced write of this run's record (and its running marker, and quota slots
        taken or given back); None if refused. ``QuotaBusy`` if a slot was taken first."""
        try:
            return await self._retry.run(
                lambda: self._store.update(
                    job.task_id,
                    mutate,
                    attempt=job.attempt,
                    lease=self._lease(),
                    fence=fence,
                    also=also,
                    refusal=QuotaBusy,
                )
            )
        except QuotaBusy:
            raise
        except StaleWrite as exc:
            log.warning("%s of %s attempt %d rejected: %s", what, job.task_id, job.attempt, exc)
        except MeshError as exc:
            log.error("cannot record %s of %s: %s", what, job.task_id, exc)
        return None


def _waited(job: Job, since_ns: int, started_ns: int) -> None:
    """The run's wait in a queue, as a span of its trace and a metric."""
    wait = tracing.TRACER.start_span(
        "queue wait",
        context=tracing.joined(job.traceparent),
        start_time=since_ns,
        attributes={"task.id": job.task_id, "task.attempt": job.attempt},
    )
    wait.end(end_time=max(since_ns, started_ns))
    metrics.observe(
        metrics.QUEUE_WAIT_SECONDS,
        max(0.0, (started_ns - since_ns) / 1e9),
        tracing.trace_id(job.traceparent),
    )


def write_result(folder: Path, task_id: str, attempt: int, data: bytes) -> Path:
    """Store a result too big for the record, under ``folder`` (0700) and nowhere else.

    The name is a hash of the task id, never the id itself: no id, however crafted,
    names a path (``/abs``, ``../x``). The file is created new (``O_EXCL``), never
    through a link (``O_NOFOLLOW``), readable by the agent alone; a random tail keeps
    two runs of one attempt (a zombie, say) from colliding.
    """
    private_dir(folder)
    digest = hashlib.sha256(task_id.encode()).hexdigest()[:32]
    path = folder.resolve() / f"{digest}.{attempt}.{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(path, flags, 0o600), "wb") as out:
        out.write(data)
    return path


async def prune_results(folder: Path, keep_s: float, every_s: float) -> None:
    """Forever: delete the results stored in ``folder`` longer ago than ``keep_s``, as
    their records expire (files only, never through a link, nothing outside it)."""
    while True:
        await asyncio.to_thread(_prune, folder, clock.now() - keep_s)
        await asyncio.sleep(every_s)


def _prune(folder: Path, before: float) -> None:
    if folder.is_symlink() or not folder.is_dir():
        return  # never prune where a link points
    for entry in os.scandir(folder):
        with contextlib.suppress(FileNotFoundError):
            if (
                entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < before
            ):
                os.unlink(entry.path)
