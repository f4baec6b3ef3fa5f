"""Handing a task to another DC, without ever letting two DCs answer for it.

A task's record lives in one DC at a time. To hand a task on, the holder first writes
an *intent* into its own record (``forwarded_to_dc`` set, ``status.agent`` still naming
the holder), then offers the task to an agent of the other DC, which records it there:

- accepted: the record is confirmed as a pointer (``status.agent`` cleared);
- refused: the intent is reverted and the task is placed elsewhere;
- no answer (a timeout, a broken connection): the holder *settles* with that DC, which
  answers from its own record, and if it has none, records a pointer back in the same
  create-if-absent transaction a late offer would need, so the task can never be
  adopted there afterwards. Until a settle answers, the task is in doubt and nobody
  places it elsewhere.

If the holder dies with an intent written, the DC's queue owner settles in its place
(``mesh.agent.owner``). Reads of a record whose intent is not confirmed are answered
from it, not from the other DC, which may not have the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from mesh import metrics
from mesh.agent.remote import RemoteDcs
from mesh.agent.retry import ETCD_WRITE
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.core.lifecycle import still_placing
from mesh.errors import (
    AlreadyPlaced,
    CancelAsked,
    MeshError,
    StaleWrite,
    TaskNotFound,
    Unavailable,
)
from mesh.store.records import Stored, TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

Outcome = peer_pb2.SettleResponse.Outcome
HELD = peer_pb2.SettleResponse.OUTCOME_HELD
NOT_HELD = peer_pb2.SettleResponse.OUTCOME_NOT_HELD
SETTLE_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class Handoffs:
    def __init__(
        self,
        dc: str,
        agent_id: str,
        store: TaskStore,
        remote: RemoteDcs,
        spawn: Callable[[str, Coroutine[Any, Any, None]], object],
        place_again: Callable[[Job], Awaitable[str]],
    ) -> None:
        """``spawn`` runs background work the agent cancels when it stops;
        ``place_again`` places a task whose hand-off came to nothing."""
        self._dc = dc
        self._agent_id = agent_id
        self._store = store
        self._remote = remote
        self._spawn = spawn
        self._place_again = place_again
        self.in_flight: dict[str, int] = {}  # hand-offs under way, per DC: the console's links

    async def offer(self, dc: str, job: Job, envelope: peer_pb2.Envelope) -> tuple[bool, str]:
        """Offer ``job`` to DC ``dc``; True once that DC holds it (or a settle is under
        way, which decides it: the task is then placed by the settle, not by the caller)."""
        self.in_flight[dc] = self.in_flight.get(dc, 0) + 1
        try:
            return await self._offer(dc, job, envelope)
        finally:
            self.in_flight[dc] -= 1

    async def _offer(self, dc: str, job: Job, envelope: peer_pb2.Envelope) -> tuple[bool, str]:
        try:
            await self._store.update(job.task_id, intent(dc, self._agent_id), attempt=job.attempt)
        except (AlreadyPlaced, CancelAsked):
            raise  # placed here after all, or to end here: the caller's to settle
        except StaleWrite as exc:
            return False, f"moved on: {exc.message}"
        except Unavailable as exc:
            return False, f"cannot record the hand-off: {exc.message}"
        try:
            reply = await self._remote.offer(dc, envelope)
        except MeshError as exc:  # whatever the answer, only settling tells
            metrics.FORWARDS.labels("error").inc()
            outcome = await self._settle_once(dc, job.task_id)
            if outcome not in (HELD, NOT_HELD):
                log.warning("hand-off of %s to %s in doubt (%s); settling", job.task_id, dc, exc)
                self._spawn(f"settle {job.task_id}", self.settle_later(dc, job))
                return True, f"in doubt: settling with DC {dc}"
            accepted, reason = outcome == HELD, f"no answer ({exc}); settled"
        else:
            metrics.FORWARDS.labels("accepted" if reply.accepted else "refused").inc()
            accepted, reason = reply.accepted, reply.reason
        if accepted:
            try:
                await self.confirm(job.task_id, job.attempt)
            except Unavailable:
                # That DC holds it: never placed again here. The confirm is written once
                # etcd answers (seed 809: a failed confirm read as a failed placement, and
                # the backlog's write cleared the hand-off of a task the other DC ran).
                self._spawn(f"settle {job.task_id}", self.settle_later(dc, job))
            return True, "accepted"
        await self._revert(job)
        return False, reason

    async def confirm(self, task_id: str, attempt: int, *fence: object) -> None:
        """The other DC holds the task: our record is only a pointer from now on. A
        cancel asked for here while the hand-off was under way (the task was answered
        for here, so the cancel was written here) is carried on to that DC."""

        def confirmed(record: peer_pb2.TaskRecord) -> bool | None:
            if not record.forwarded_to_dc:
                return False
            record.status.agent = ""
            return None

        try:
            stored = await self._store.update(task_id, confirmed, attempt=attempt, fence=fence)
        except StaleWrite:
            return
        record = stored.record
        if record.cancel_requested and (dc := pointed_to(record)):
            deadline = record.status.deadline.ToMilliseconds()
            self._spawn(
                f"cancel {task_id} in {dc}",
                self._carry_cancel(dc, task_id, record.cancel_reason, deadline),
            )

    async def _carry_cancel(self, dc: str, task_id: str, reason: str, deadline_ms: int) -> None:
        """Cancel ``task_id`` in ``dc``, retried until that DC answers or the task's
        deadline passes (which ends it there anyway)."""
        tries = 0
        while now_ms() < deadline_ms:
            try:
                await self._remote.cancel(dc, task_id, reason)
                return
            except TaskNotFound:
                return  # the hand-off was undone: the task is ours again, and so is the cancel
            except Unavailable as exc:
                log.info("cancel of %s in DC %s not delivered yet: %s", task_id, dc, exc)
            await asyncio.sleep(SETTLE_RETRY_S[min(tries, len(SETTLE_RETRY_S) - 1)])
            tries += 1

    async def _revert(self, job: Job) -> None:
        def back(record: peer_pb2.TaskRecord) -> None:
            record.forwarded_to_dc = ""
            record.status.dc = self._dc

        # Should it fail even so, the backlog's write clears the intent (no agent's
        # accept does: see ``claim_run``).
        with contextlib.suppress(MeshError):
            await ETCD_WRITE.run(lambda: self._store.update(job.task_id, back, attempt=job.attempt))

    async def _settle_once(self, dc: str, task_id: str) -> Outcome | None:
        try:
            reply = await self._remote.settle(dc, task_id, self._dc)
        except MeshError as exc:
            log.info("settling %s with DC %s: %s", task_id, dc, exc)
            return None
        return reply.outcome

    async def settle(self, dc: str, task_id: str, deadline_ms: int) -> Outcome | None:
        """Settle until DC ``dc`` answers for good, or the task's deadline passes (None)."""
        tries = 0
        while now_ms() < deadline_ms:
            outcome = await self._settle_once(dc, task_id)
            if outcome in (HELD, NOT_HELD):
                return outcome
            await asyncio.sleep(SETTLE_RETRY_S[min(tries, len(SETTLE_RETRY_S) - 1)])
            tries += 1
        return None

    async def decide(
        self,
        stored: Stored,
        fence: tuple[object, ...],
        take_back: Callable[[Stored], Awaitable[None]],
    ) -> None:
        """Decide a hand-off whose holder is gone (a dead agent, or this agent's earlier
        run) with the DC it was handing the task to: point there if that DC holds the
        task, else ``take_back`` (the task is this DC's again); failed if that DC never
        answered before the task's deadline. ``fence`` guards the confirm."""
        record, status = stored.record, stored.status
        deadline = status.deadline.ToMilliseconds()
        outcome = await self.settle(record.forwarded_to_dc, status.task_id, deadline)
        try:
            if outcome == HELD:
                await self.confirm(status.task_id, status.attempt, *fence)
            elif outcome == NOT_HELD:
                await take_back(stored)
            else:
                await self._store.finish(
                    status.task_id,
                    pb.TASK_STATE_FAILED,
                    "UNAVAILABLE",
                    f"DC {record.forwarded_to_dc} never answered for it before its deadline",
                    attempt=status.attempt,
                )
        except MeshError as exc:
            log.warning("could not settle %s: %s", status.task_id, exc)

    async def settle_later(self, dc: str, job: Job) -> None:
        """Settle this agent's hand-off of ``job`` to ``dc`` that is in doubt: point there
        if that DC holds it, else take it back and place it again. Nobody else settles a
        hand-off whose holder lives, so what the settle decided is written however long
        this DC's etcd is away, until the task's deadline (past it, the watchdog ends it)."""
        outcome = await self.settle(dc, job.task_id, job.deadline_ms)
        if outcome is None:
            log.error("hand-off of %s to %s never settled before its deadline", job.task_id, dc)
            return
        tries = 0
        while True:
            try:
                if outcome == HELD:
                    await self.confirm(job.task_id, job.attempt)
                else:
                    await self._revert(job)
                    await self._place_again(job)
                return
            except Unavailable as exc:
                if now_ms() >= job.deadline_ms:
                    log.error("hand-off of %s settled, unrecorded: %s", job.task_id, exc)
                    return
                log.info("settled hand-off of %s not recorded yet: %s", job.task_id, exc)
            except MeshError as exc:
                log.warning("could not place %s after its hand-off failed: %s", job.task_id, exc)
                return
            await asyncio.sleep(SETTLE_RETRY_S[min(tries, len(SETTLE_RETRY_S) - 1)])
            tries += 1


def intent(dc: str, holder: str) -> Callable[[peer_pb2.TaskRecord], None]:
    """The hand-off of a task to DC ``dc`` by agent ``holder``, before the offer. The
    record names the holder, whatever it named before (nobody, for a task the queue
    owner re-queued): a hand-off naming no agent would read as a confirmed pointer, and
    should the holder die, the owner finds the hand-off among its tasks and settles it."""

    def mark(record: peer_pb2.TaskRecord) -> None:
        still_placing(record)
        if record.cancel_requested:  # asked for while it was being placed: it ends here
            raise CancelAsked("a cancel was asked for", task_id=record.status.task_id)
        record.forwarded_to_dc = dc
        record.status.dc = dc
        record.status.agent = holder

    return mark


def unconfirmed(record: peer_pb2.TaskRecord) -> bool:
    """A hand-off written but not yet known to have landed."""
    return bool(record.forwarded_to_dc and record.status.agent)


def pointed_to(record: peer_pb2.TaskRecord) -> str:
    """The DC a confirmed hand-off gave the task to ("" while none is confirmed)."""
    return "" if unconfirmed(record) else record.forwarded_to_dc
