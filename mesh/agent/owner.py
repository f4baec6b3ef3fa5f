"""The DC's queue owner: the one leader in the mesh, elected per DC through etcd.

While it leads, it works the DC's durable backlog (``mesh.agent.dispatch``: dispatch as
capacity frees, by class weight and age; cancelled and expired entries ended whether or
not there is room), and it re-places the work of agents that died: when an agent's
membership key goes (its lease expired: crashed, or paused past the TTL), every task
still recorded on it (queued, or running: its running marker went with the same lease)
gets attempt + 1 and is placed again, or fails with the reason once ``max_attempts``
runs have been tried, or when its payload was only held by the dead agent. On taking
office it also sweeps for tasks left on agents that are no longer members, which covers
deaths while nobody led (and an owner that died between taking a task and placing it).

Every write is fenced by the leadership (a deposed owner cannot write), and the bumped
attempt fences the dead agent: should it come back, its late writes are refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from mesh import metrics
from mesh.agent.dispatch import DcRoom, Deposed, Dispatcher, still_leading
from mesh.agent.handoff import Handoffs
from mesh.agent.history import History
from mesh.agent.placements import Placements
from mesh.core.jobs import Job
from mesh.core.lifecycle import requeue, requeued_job
from mesh.core.priority import Policy
from mesh.core.task import TERMINAL
from mesh.errors import MeshError, StaleWrite, Unavailable
from mesh.store import kv
from mesh.store.backlog import Backlog
from mesh.store.election import Election
from mesh.store.records import Stored, TaskStore
from mesh.v1 import peer_pb2

log = logging.getLogger(__name__)

RESIGN_S = 2.0  # the most an owner waits on etcd to resign a term that ended
WATCHDOG_S = 1.0
GUARD_STRIKES = 2  # checks in a row that find the election held and no term running
STALL_S = 30.0  # a dispatcher that has not come round for this long is wedged


class Stalled(MeshError):
    """The owner's dispatcher stopped coming round: its term is given up."""


class QueueOwner:
    def __init__(
        self,
        agent_id: str,
        election: Election,
        store: TaskStore,
        backlog: Backlog,
        place: Callable[[Job], Awaitable[str]],
        room: DcRoom,
        policy: Policy,
        max_attempts: int,
        history: History,
        handoffs: Handoffs,
        reconcile: Callable[[], Awaitable[None]],
    ) -> None:
        """``place`` places a job (into the backlog if nothing can take it); ``room`` is
        the router's view of the DC (``DcRoom``); ``handoffs`` settles what a
        dead agent was handing to another DC; ``reconcile`` claims the ids recorded
        while their home DC could not be asked. ``history`` hears every term and every
        fenced write with the token it carried."""
        self.election = election
        self._reconcile = reconcile
        self._handoffs = handoffs
        self._dc = backlog.dc
        self._store = store
        self._max_attempts = max_attempts
        self._history = history
        self._wake = asyncio.Event()
        self.leading = 0  # the term this owner's duties run for now (0: none)
        self._members: set[str] = set()
        self._departed: asyncio.Queue[str] = asyncio.Queue()
        self._placements = Placements(store, place, self._wake.set)
        self.dispatcher = Dispatcher(
            agent_id,
            election,
            store,
            backlog,
            room,
            policy,
            history,
            self._placements,
            self._wake,
        )

    def members_changed(self, changes: Mapping[str, object | None]) -> None:
        """Agents that joined or changed (a record) or left (None)."""
        for agent_id, record in sorted(changes.items()):
            if record is not None:
                self._members.add(agent_id)
            elif agent_id in self._members:
                self._members.discard(agent_id)
                self._departed.put_nowait(agent_id)

    def capacity_changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Campaign, then lead, until the agent stops this duty; etcd trouble on the way
        makes it stand again, never give up. A term lasts while all of its duties run:
        when one ends (it raised, was deposed, or was cancelled though nobody stopped
        the owner), the others are stopped and the owner resigns at once, so another
        agent can lead, then stands again. An owner never keeps its election key while
        nothing dispatches. Placements under way go on across terms: each ends by
        itself (placed, or by its deadline)."""
        try:
            while True:
                try:
                    term = await self.election.campaign()
                except MeshError as exc:
                    log.warning("queue owner: cannot campaign (%s); again in 1s", exc)
                    await asyncio.sleep(1)
                    continue
                log.info("queue owner of the DC", extra={"term": term})
                self._history.write("owner", "elected", token=term)
                metrics.OWNER_TERMS.inc()
                self.leading = term
                try:
                    await self._lead(term)
                finally:
                    await self._step_down(term)
                    self.leading = 0
                await asyncio.sleep(1)
        finally:
            self._placements.cancel()

    async def _lead(self, term: int) -> None:
        """Run the term's duties until the first of them ends, and say how it ended."""
        duties = {
            asyncio.create_task(work, name=f"owner {name}"): name
            for name, work in (
                ("orphans", self._recover_orphans()),
                ("dispatch", self.dispatcher.run()),
                ("reconcile", self._reconcile()),
                ("watchdog", self._watchdog()),
            )
        }
        try:
            done, _ = await asyncio.wait(duties, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in duties:
                task.cancel()
            await asyncio.gather(*duties, return_exceptions=True)
        for task in done:
            name = duties[task]
            error = None if task.cancelled() else task.exception()
            if isinstance(error, Deposed):
                log.info("queue owner: deposed (term %d)", term)
                why = "deposed"
            elif error is None:
                log.error("queue owner: its %s ended in term %d, unasked", name, term)
                why = "cancelled" if task.cancelled() else "returned"
            else:
                log.error("queue owner: its %s failed in term %d", name, term, exc_info=error)
                why = "failed"
            metrics.DUTY_ERRORS.labels(f"queue owner {name}").inc()
            metrics.OWNER_RESIGNED.labels(why).inc()
            self._history.write("owner", "term ended", token=term, duty=name, why=why)

    async def _step_down(self, term: int) -> None:
        """Give up ``term`` at once (fenced by it: a newer term is never touched)."""
        if self.election.term != term:
            return
        try:
            async with asyncio.timeout(RESIGN_S):
                await self.election.resign()
        except TimeoutError:
            log.warning("queue owner: could not resign term %d in %.0fs", term, RESIGN_S)

    async def _watchdog(self) -> None:
        """Raise ``Stalled`` once the dispatcher has not come round for ``STALL_S``: a
        dispatch loop wedged on something that never answers ends the term too."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(WATCHDOG_S)
            last = max(started, self.dispatcher.ticked)
            if loop.time() - last > STALL_S:
                raise Stalled(f"the dispatcher has not come round for {STALL_S:.0f}s")

    async def guard(self, every_s: float) -> None:
        """Forever: should etcd say this agent leads the DC's queue while no term of
        this owner runs (its duty was lost, however), resign, so another agent leads
        instead of a DC whose backlog nobody dispatches. Two checks in a row must agree:
        a term may be between its campaign and its first duty at one of them."""
        strikes = 0
        while True:
            await asyncio.sleep(every_s)
            try:
                held = not self.leading and await self.election.leads()
            except Unavailable:
                continue  # etcd away: nobody can take the queue over meanwhile anyway
            strikes = strikes + 1 if held else 0
            if strikes >= GUARD_STRIKES:
                log.error("queue owner: holds the election but leads no term; resigning")
                metrics.OWNER_RESIGNED.labels("idle").inc()
                await self.election.resign()
                strikes = 0

    async def _recover_orphans(self) -> None:
        await self._sweep(lambda agent: agent not in self._members)
        while True:
            gone = {await self._departed.get()}
            while not self._departed.empty():  # one sweep for all who left meanwhile
                gone.add(self._departed.get_nowait())
            for member in sorted(gone):
                self._history.write("departed", "seen", member=member, token=self.election.term)
            await self._sweep(gone.__contains__)

    # -- dead agents ---------------------------------------------------------------------

    async def _sweep(self, dead: Callable[[str], bool]) -> None:
        for stored in await self._store.scan():
            status = stored.status
            if status.state in TERMINAL or not status.agent or not dead(status.agent):
                continue
            if stored.record.forwarded_to_dc:  # it died handing the task to another DC
                name = f"settle {status.task_id}"
                term = (self.election.fence(), self.election.term)
                self._placements.track(name, self._settle(stored, term))
                continue
            try:
                await self._requeue(stored)
            except Deposed:
                raise
            except MeshError as exc:
                log.warning("could not re-queue %s: %s", status.task_id, exc)

    async def _settle(self, stored: Stored, term: tuple[kv.Compare, int]) -> None:
        """Decide a dead agent's hand-off with the DC it was handing the task to: point
        there if that DC holds the task, else take it back and run it here. Its writes
        are fenced by the ``term`` (fence, token) that found it: a settle outlives its
        term, and a later term (or none) must not lend it its fence."""
        await self._handoffs.decide(
            stored, (term[0],), lambda taken: self._requeue(taken, reclaim=True, term=term)
        )

    async def _requeue(
        self, stored: Stored, reclaim: bool = False, term: tuple[kv.Compare, int] | None = None
    ) -> None:
        """Re-queue a dead agent's task, fenced by ``term`` (this owner's current one by
        default); with ``reclaim``, one it was handing to another DC that does not hold
        it: the pointer goes, the task is this DC's again."""
        fence, token = term or (self.election.fence(), self.election.term)
        dead_agent = stored.status.agent
        verdict = ""

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal verdict
            if reclaim:
                record.forwarded_to_dc = ""
                record.status.dc = self._dc
            verdict = requeue(record, dead_agent, self._max_attempts)
            return None if verdict else False

        try:
            updated = await self._store.update(stored.status.task_id, mutate, fence=[fence])
        except StaleWrite:
            self._history.write("requeue", "rejected", task=stored.status.task_id, token=token)
            await still_leading(self.election)
            raise
        if verdict:
            self._history.write(
                "requeue",
                verdict,
                task=updated.status.task_id,
                token=token,
                attempt=updated.status.attempt,
                rev=updated.revision,
                dead=dead_agent,
            )
        if verdict != "requeued":
            if verdict:
                log.info("task %s failed: its agent %s died", updated.status.task_id, dead_agent)
            return
        job = requeued_job(updated.status, updated.record.traceparent)
        log.info("re-queued %s as attempt %d (agent %s died)", job.task_id, job.attempt, dead_agent)
        self._placements.spawn(job)
