"""Taking a task onto this agent: by its own live load, which gossip may not have caught
up with, and then recording it as its own.

The job is queued before any await, so the check still holds when it is queued; the
record follows. A record that refuses the write (the task moved on) takes the job out of
the queue again, unless the record shows this agent already running it.
"""

from __future__ import annotations

from mesh.agent.executor import Executor
from mesh.agent.history import History
from mesh.config import AgentConfig
from mesh.core.clock import now_ms, now_ts
from mesh.core.jobs import Job
from mesh.core.lifecycle import claim_run
from mesh.core.task import spec_digest
from mesh.errors import InvalidTask, MeshError, StaleWrite, Unsure
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb


class Acceptance:
    def __init__(
        self, cfg: AgentConfig, store: TaskStore, executor: Executor, history: History
    ) -> None:
        self._cfg = cfg
        self._store = store
        self._executor = executor
        self._history = history
        # The expected start (ms) written for each task accepted here, for the part that
        # keeps it true as the queue moves (``mesh.agent.conserve``).
        self.written: dict[str, int] = {}

    async def accept(self, job: Job, max_tasks: float, reclaim: bool = False) -> tuple[bool, str]:
        """Queue ``job`` here if our live load allows: within ``max_tasks`` running and
        queued after it, or (0) within our hard limit, slots plus queue length; past it
        when asked to ``reclaim`` and borrowed batch runs here will give their GPUs."""
        if job.deadline_ms <= now_ms():
            return False, "deadline passed"
        if (answer := self._held(job)) is not None:
            return answer
        reclaiming = reclaim and self._executor.can_reclaim(job.spec)
        try:
            self._executor.check(job.spec, past_bound=reclaiming)
        except MeshError as exc:
            return False, exc.message
        tasks = self._executor.running + self._executor.queued
        limit = max_tasks or self._executor.slots + self._cfg.max_queue_length
        if tasks + 1 > limit and not reclaiming:
            return False, f"over the bound ({tasks + 1} > {limit:g} tasks)"
        self._moved_in(job)
        # Enqueue before any await, so the check above still holds; the record follows.
        self._executor.enqueue(job, past_bound=reclaiming)
        wait_s = self._executor.expected.start_s(job.task_id)  # as it stands now
        due_ms = None if wait_s is None else now_ms() + int(wait_s * 1000)

        def mutate(record: peer_pb2.TaskRecord, digest: str = spec_digest(job.spec)) -> None:
            if record.spec_digest and record.spec_digest != digest:
                raise InvalidTask("the offered spec is not the recorded one")
            status = record.status
            claim_run(record, self._cfg.agent_id)
            status.dc = self._cfg.dc
            del status.path[:]
            status.path.extend(job.path)
            if status.state == pb.TASK_STATE_PENDING:
                status.state = pb.TASK_STATE_QUEUED
                status.queued_at.CopyFrom(now_ts())
            status.ClearField("expected_start")
            if due_ms is not None:
                status.expected_start.FromMilliseconds(due_ms)
            return None

        try:
            await self._store.update(job.task_id, mutate, attempt=job.attempt)
        except Unsure:
            # Perhaps written: the record may name this agent. The job stays queued, and
            # its start write decides: it runs if the record is this run's, and is
            # dropped, untouched, if another agent's accept or the owner moved it on.
            return True, "accepted (the record write is unsure)"
        except MeshError as exc:
            if isinstance(exc, StaleWrite) and await self._runs_here(job):
                return True, "accepted"
            # Not ours: out of the queue, and a run whose start is in flight is left to
            # its start write, which the record refuses too. Cancelling that run instead
            # would write its end over the record of the agent that runs the task.
            self._executor.withdraw(job.task_id)
            return False, f"record: {exc.message}"
        if due_ms is not None:
            self.written[job.task_id] = due_ms
        return True, "accepted"

    def _held(self, job: Job) -> tuple[bool, str] | None:
        """The answer when this agent holds an attempt of ``job``'s task already (None:
        it holds none now). The same run offered again (an answer lost on the way, a
        hand-back that crossed a placement) is here already, and runs once. An earlier
        attempt still waiting here was given up by the record (the owner re-queued it):
        it goes, or the two would share the task's id here and the stale one's end would
        take the new one with it (sim seed 503: the new attempt was never started)."""
        held = self._executor.holding(job.task_id)
        if held is None:
            return None
        if held.attempt == job.attempt:
            return True, "already here"
        if held.attempt > job.attempt or not self._executor.withdraw(job.task_id):
            return False, f"attempt {held.attempt} of it is here"
        return None

    def _moved_in(self, job: Job) -> None:
        """A job moved here from another agent's queue keeps its place (``waited_s``):
        the history says so, for the checker to hold the mesh to it."""
        if job.waited_s:
            self._history.write(
                "queue", "moved in", task=job.task_id, attempt=job.attempt, waited=job.waited_s
            )

    async def _runs_here(self, job: Job) -> bool:
        """Whether the record shows this agent running (or having run) ``job``'s attempt:
        a short task can start, even finish, before the accepting write lands. A record
        still pending names the agent placing it, and one being handed to another DC the
        agent handing it over: neither is a run here (seed 714: the queue owner, whose
        hand-off was refused and could not be taken back, took its own intent for a run)."""
        try:
            record = (await self._store.get(job.task_id)).record
        except MeshError:
            return False
        status = record.status
        return (
            not record.forwarded_to_dc
            and status.state != pb.TASK_STATE_PENDING
            and status.agent == self._cfg.agent_id
            and status.attempt == job.attempt
        )
