"""Keeping the DC's GPUs busy and a waiting task's expected start true.

This agent's queued tasks go to idle agents of its DC when they would start there sooner
(``mesh.core.conserve`` decides), and the expected start each waiting task's record shows
is written again as the queue moves and run times are learned.

The bound: a task stays queued here while an agent of the DC that may run it has a slot
free for at most the time that agent's load takes to reach this one by gossip (a few
rounds of ``gossip_interval_s``: 0.2 s each by default), plus ``EVERY_S`` (one round of
this part), plus an offer's round trip; then it starts there, paying the model's load if
it is cold there (it moves only when waiting here would take longer than that).

A move takes the job out of this agent's queue first, so this agent cannot start it
meanwhile; if the other agent refuses, or its answer is lost, the job goes back into the
queue (an accept whose answer was lost leaves two agents holding one attempt: the first
start write wins and the other start is refused, so it still runs once).
"""

from __future__ import annotations

import asyncio
import logging
import math

from mesh import metrics
from mesh.agent.executor import Executor
from mesh.agent.history import History
from mesh.agent.placement import Placement, request_of
from mesh.config import AgentConfig
from mesh.core import conserve
from mesh.core.clock import now_ms
from mesh.core.dcview import DcView
from mesh.core.jobs import Job
from mesh.errors import MeshError
from mesh.pipelines import Models
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

EVERY_S = 0.25  # a round at most this often: the view changes with every gossip message
REVISE_S = 1.0  # expected starts are looked at this often though nothing changed
DRIFT_MS = 1000  # an expected start moved by more than this is written again
MARGIN_S = 0.5  # a move must save more than this: the view may be a gossip round old


class Conserver:
    def __init__(
        self,
        cfg: AgentConfig,
        executor: Executor,
        view: DcView,
        models: Models,
        placement: Placement,
        store: TaskStore,
        written: dict[str, int],
        history: History,
    ) -> None:
        """``written``: the expected start (ms) last written for each task queued here,
        as acceptance wrote it, shared so this part knows what the record says."""
        self._cfg = cfg
        self._executor = executor
        self._view = view
        self._models = models
        self._placement = placement
        self._store = store
        self._written = written
        self._history = history
        self._wake = asyncio.Event()

    def changed(self) -> None:
        """The DC's loads or this agent's queue changed: look again soon."""
        self._wake.set()

    async def run(self) -> None:
        """Rounds for as long as the agent runs; cancel to stop."""
        while True:
            try:
                async with asyncio.timeout(REVISE_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._executor.accepting:
                await self.round()
            await asyncio.sleep(EVERY_S)

    async def round(self) -> None:
        """Move what starts sooner elsewhere, then write the expected starts that moved."""
        waiting = self._executor.expected.waiting()
        if self._cfg.work_conserving and waiting:
            jobs = {job.task_id: job for job, _ in waiting}
            tasks = [
                conserve.Waiting(job.task_id, request_of(job.spec).needs, wait_s)
                for job, wait_s in waiting
            ]
            me = self._cfg.agent_id
            for move in conserve.moves(self._view, me, tasks, self._models.load_s, MARGIN_S):
                await self._move(jobs[move.task_id], move)
            waiting = self._executor.expected.waiting()
        await self._revise(waiting)

    async def _move(self, job: Job, move: conserve.Move) -> None:
        if not self._executor.withdraw(job.task_id):
            return  # started (or cancelled) since the round began
        slots, waited = self._view.members[move.agent_id].slots, job.waited_s
        accepted, reason = await self._placement.offer_agent(move.agent_id, slots, job)
        how = "moved" if accepted else "kept"
        metrics.MOVES.labels(how).inc()
        self._history.write(
            "queue", how, task=job.task_id, attempt=job.attempt, to=move.agent_id, waited=waited
        )
        if accepted:
            self._written.pop(job.task_id, None)
            log.info("moved %s to idle %s (%s)", job.task_id, move.agent_id, reason)
            return
        if self._executor.accepting:
            self._executor.enqueue(job, past_bound=True)
        else:  # draining since: placed elsewhere, as the drain does with its queue
            await self._placement.place(job)

    async def _revise(self, waiting: list[tuple[Job, float]]) -> None:
        now = now_ms()
        queued = set()
        for job, wait_s in waiting:
            queued.add(job.task_id)
            if math.isinf(wait_s):
                continue
            written = self._written.get(job.task_id)
            due = now + int(wait_s * 1000)
            if written is not None and abs(due - written) <= DRIFT_MS and written >= now:
                continue
            # An estimate run out (a run longer than expected) is not written as "now"
            # round after round: it says "a moment yet" until the queue moves.
            due = max(due, now + DRIFT_MS)
            await self._write(job, due)
        for task_id in self._written.keys() - queued:
            del self._written[task_id]

    async def _write(self, job: Job, due_ms: int) -> None:
        me = self._cfg.agent_id

        def revised(record: peer_pb2.TaskRecord) -> bool | None:
            status = record.status
            if status.state != pb.TASK_STATE_QUEUED or status.agent != me:
                return False  # no longer waiting here: nothing to write
            status.expected_start.FromMilliseconds(due_ms)
            return None

        self._written[job.task_id] = due_ms  # tried again only once it drifts: etcd may be away
        try:
            await self._store.update(job.task_id, revised, attempt=job.attempt)
        except MeshError as exc:
            log.debug("expected start of %s not written: %s", job.task_id, exc)
