"""Cancelling a task wherever it is: any agent takes the request for any task.

A cancel takes effect at once wherever the task is: one waiting in the DC's backlog ends
with its entry taken, in one transaction; one queued on an agent is dropped there; a
running one has its process group killed by its agent; one handed to another DC is
cancelled there once the hand-off is confirmed, and there at once if it holds it already
(the caller hears UNAVAILABLE while that DC may hold it and cannot say).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from mesh import metrics
from mesh.agent.executor import Executor
from mesh.agent.handoff import pointed_to
from mesh.agent.retry import patient
from mesh.agent.tasks import Reach, answering
from mesh.core.jobs import Job
from mesh.core.lifecycle import end
from mesh.core.task import TERMINAL, public
from mesh.errors import MeshError, StaleWrite, TaskNotFound, Unavailable
from mesh.store.backlog import Backlog
from mesh.store.records import Stored
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

UNWIND_S = 1.0  # how long a cancel waits for a running task to record its end
CALL_TIMEOUT_S = 3 * UNWIND_S  # a peer's CancelLocal: its wait, and the way there and back
MOVES = 3  # agents a cancel follows a task through as it is placed


class Cancels:
    def __init__(
        self,
        reach: Reach,
        backlog: Backlog,
        executor: Executor,
        backlog_changed: Callable[[], None],
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
        patience_s: float,
    ) -> None:
        """``backlog_changed`` wakes the DC's queue owner, if this agent is it; ``spawn``
        runs background work the agent cancels when it stops; ``patience_s`` is how long
        a write waits out an etcd outage (lease TTL and outage grace)."""
        self._reach = reach
        self._me = reach.agent_id
        self._store = reach.store
        self._backlog = backlog
        self._executor = executor
        self._backlog_changed = backlog_changed
        self._spawn = spawn
        self._patience_s = patience_s

    async def _end_waiting(
        self, stored: Stored, reason: str, superseded_by: str
    ) -> pb.TaskStatus | None:
        """End a task waiting in the DC's backlog and take its entry, in one transaction
        that holds only if the entry is still there and the record unchanged; None if
        the owner took it meanwhile (then it is cancelled where it went)."""
        task_id = stored.status.task_id
        entry = self._backlog.entry_of(stored.record.backlog_entry)

        def mutate(record: peer_pb2.TaskRecord) -> bool | None:
            if (
                record.status.state in TERMINAL
                or record.backlog_entry != stored.record.backlog_entry
            ):
                return False
            record.cancel_requested = True
            record.cancel_reason = reason
            record.superseded_by_dc = superseded_by
            record.backlog_entry = ""
            end(record.status, pb.TASK_STATE_CANCELLED, "CANCELLED", reason or "cancelled by user")
            return None

        try:
            ended = await self._backlog.take(task_id, entry, mutate)
        except StaleWrite:
            return None
        if ended.status.state not in TERMINAL:
            return None
        metrics.BACKLOG_ENDED.labels("CANCELLED").inc()
        self._backlog_changed()  # its place in the backlog is free: the owner may move on
        return public(ended.status)

    async def cancel(
        self, task_id: str, reason: str, forward: bool = True, superseded_by: str = ""
    ) -> pb.TaskStatus:
        """Cancel the task wherever it is. ``superseded_by``: the copy here is cancelled
        because that DC holds its id; the same write that asks for the cancel says so,
        so a watcher here goes on to that DC's copy before this one ends.

        A task being handed to another DC is answered for here until the hand-off is
        confirmed. The request is written here, and whichever of the two writes comes
        second carries it on: the confirm that finds a cancel asked for
        (``Handoffs.confirm``), or this cancel finding its request written over a
        confirmed pointer."""

        def request(record: peer_pb2.TaskRecord) -> bool | None:
            if record.status.state in TERMINAL or record.cancel_requested:
                return False
            record.cancel_requested = True
            record.cancel_reason = reason
            record.superseded_by_dc = superseded_by
            return None

        here = await answering(self._store, self._reach.addressing, task_id, forward)
        if isinstance(here, str):
            return await self._reach.remote.cancel(here, task_id, reason)
        if here.record.backlog_entry:
            ended = await self._end_waiting(here, reason, superseded_by)
            if ended is not None:
                return ended
        stored = await self._store.update(task_id, request)
        if dc := pointed_to(stored.record):  # handed over meanwhile: cancel it there
            return await self._reach.remote.cancel(dc, task_id, reason)
        if (dc := stored.record.forwarded_to_dc) and not superseded_by:
            if not forward:  # asked by another DC, which may be that DC: no promise here
                raise Unavailable(
                    f"being handed to DC {dc}; the cancel is recorded: ask again",
                    task_id=task_id,
                )
            return await self._in_doubt(dc, task_id, reason)
        for _ in range(MOVES):
            status = stored.status
            if status.state in TERMINAL or not status.agent:
                self._backlog_changed()  # placed meanwhile, or being placed: the owner ends it
                return public(status)
            try:
                return await self._cancel_on(status.agent, task_id, reason)
            except TaskNotFound:  # it moved on from that agent: look where it is now
                stored = await self._store.get(task_id)
        return public(stored.status)  # still moving: recorded, it ends where it starts

    async def _in_doubt(self, dc: str, task_id: str, reason: str) -> pb.TaskStatus:
        """A hand-off to ``dc`` not confirmed yet: the task may already be there, where
        the request written here is unseen until the confirm carries it, and may end
        first. So it is cancelled there too; a DC that does not hold it (yet), or does
        not answer, gets no promise made in its name: the caller hears UNAVAILABLE and
        asks again once the hand-off is settled (the request stays written here)."""
        try:
            return await self._reach.remote.cancel(dc, task_id, reason)
        except TaskNotFound:
            raise Unavailable(
                f"being handed to DC {dc}; the cancel is recorded: ask again", task_id=task_id
            ) from None

    async def _cancel_on(self, agent: str, task_id: str, reason: str) -> pb.TaskStatus:
        if agent == self._me:
            return await self.cancel_local(task_id, reason)
        peer = self._reach.registry.peers.get(agent)
        if peer is None:
            raise Unavailable("the executing agent is not a member now", agent=agent)
        try:
            return await self._reach.peers.cancel_local(
                peer.peer_address,
                self._reach.registry.dc,
                pb.CancelRequest(task_id=task_id, reason=reason),
                CALL_TIMEOUT_S,
            )
        except TaskNotFound as exc:
            raise TaskNotFound("not on that agent now", task_id=task_id) from exc
        except MeshError as exc:
            raise Unavailable(f"executing agent unreachable: {exc.code}", agent=agent) from exc

    async def cancel_local(self, task_id: str, reason: str) -> pb.TaskStatus:
        """Cancel a task queued or running on this agent."""
        why = reason or "cancelled by user"
        queued = self._executor.cancel(task_id, why)
        if queued is not None:
            try:
                await self._finish(queued, why)
            except Unavailable:
                # Out of the queue and not yet ended: never lost between the two.
                self._spawn(f"cancel {task_id}", self._finish_later(queued, why))
                raise
        elif self._executor.holding(task_id) is None:
            stored = await self._store.get(task_id)
            if stored.status.agent != self._me:
                raise TaskNotFound("task is not on this agent", task_id=task_id)
        # A running task records CANCELLED itself as it unwinds; wait briefly for that.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UNWIND_S):
                async for stored in self._store.follow(task_id):
                    if stored.status.state in TERMINAL:
                        break
        return public((await self._store.get(task_id)).status)

    async def _finish(self, job: Job, why: str) -> None:
        with contextlib.suppress(StaleWrite):  # it moved on: nothing of it is here
            await self._store.finish(
                job.task_id, pb.TASK_STATE_CANCELLED, "CANCELLED", why, attempt=job.attempt
            )

    async def _finish_later(self, job: Job, why: str) -> None:
        """End a cancelled queued job once etcd answers, as a run's end waits out an
        outage; should it never answer, the job goes back in the queue, and its start
        (which reads the cancel asked for) ends it, so it is never left QUEUED here."""
        try:
            await patient(self._patience_s).run(lambda: self._finish(job, why))
        except Unavailable:
            self._executor.enqueue(job, past_bound=True)
