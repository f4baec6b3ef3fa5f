"""Reading and cancelling tasks, wherever they run.

A task's record lives in its DC's etcd, so any agent of the DC answers ``Get``, ``Watch``
and ``List``; a record that only points to the DC the task overflowed to is followed
there through that DC's agents, once the hand-off is confirmed (until then the other DC
may not have it, and the record here answers). A cancel is recorded on the task
(``cancel_requested``) and then carried out where the task is: by the queue owner if it
waits in the backlog, by the executing agent if it is queued or running there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from mesh.agent.executor import Executor
from mesh.agent.handoff import unconfirmed
from mesh.agent.peers import PeerClients
from mesh.agent.remote import RemoteDcs
from mesh.core.task import TERMINAL, public
from mesh.errors import StaleWrite, TaskNotFound, Unavailable
from mesh.store.records import Page, TaskStore
from mesh.store.registry import Registry
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

CALL_TIMEOUT_S = 2.0  # a peer's CancelLocal, and how long a cancelled run may take to unwind


class Tasks:
    def __init__(
        self,
        agent_id: str,
        store: TaskStore,
        registry: Registry,
        peers: PeerClients,
        remote: RemoteDcs,
        executor: Executor,
        backlog_changed: Callable[[], None],
    ) -> None:
        """``backlog_changed`` wakes the DC's queue owner, if this agent is it."""
        self._me = agent_id
        self._store = store
        self._registry = registry
        self._peers = peers
        self._remote = remote
        self._executor = executor
        self._backlog_changed = backlog_changed

    async def get(self, task_id: str) -> pb.TaskStatus:
        stored = await self._store.get(task_id)
        if confirmed_pointer(stored.record):
            return await self._remote.get(stored.record.forwarded_to_dc, task_id)
        return public(stored.status)

    async def follow(self, task_id: str) -> AsyncIterator[pb.TaskStatus]:
        """The task's statuses until it ends; from its DC's agents if it overflowed."""
        async for stored in self._store.follow(task_id):
            if confirmed_pointer(stored.record):
                async for status in self._remote.watch(stored.record.forwarded_to_dc, task_id):
                    yield status
                return
            yield public(stored.status)

    async def list(self, *, user_id: str, state: int, limit: int, after: str) -> Page:
        return await self._store.list(user_id=user_id, state=state, limit=limit, after=after)

    async def cancel(self, task_id: str, reason: str) -> pb.TaskStatus:
        def request(record: peer_pb2.TaskRecord) -> bool | None:
            if record.status.state in TERMINAL or record.cancel_requested:
                return False
            record.cancel_requested = True
            return None

        stored = await self._store.get(task_id)
        if confirmed_pointer(stored.record):
            return await self._remote.cancel(stored.record.forwarded_to_dc, task_id, reason)
        stored = await self._store.update(task_id, request)
        status = stored.status
        if status.state in TERMINAL or not status.agent:
            self._backlog_changed()  # a backlogged task: the owner ends it
            return public(status)
        if status.agent == self._me:
            return await self.cancel_local(task_id, reason)
        peer = self._registry.peers.get(status.agent)
        if peer is None:
            raise Unavailable("the executing agent is not a member now", agent=status.agent)
        try:
            return await self._peers.cancel_local(
                peer.peer_address,
                self._registry.dc,
                pb.CancelRequest(task_id=task_id, reason=reason),
                CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"executing agent unreachable: {exc.code().name}", agent=status.agent
            ) from exc

    async def cancel_local(self, task_id: str, reason: str) -> pb.TaskStatus:
        """Cancel a task queued or running on this agent."""
        why = reason or "cancelled by user"
        queued = self._executor.cancel(task_id, why)
        if queued is not None:
            with contextlib.suppress(StaleWrite):
                await self._store.finish(
                    task_id, pb.TASK_STATE_CANCELLED, "CANCELLED", why, attempt=queued.attempt
                )
        elif not self._executor.holds(task_id):
            stored = await self._store.get(task_id)
            if stored.status.agent != self._me:
                raise TaskNotFound("task is not on this agent", task_id=task_id)
        # A running task records CANCELLED itself as it unwinds; wait briefly for that.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CALL_TIMEOUT_S):
                async for stored in self._store.follow(task_id):
                    if stored.status.state in TERMINAL:
                        break
        return public((await self._store.get(task_id)).status)


def confirmed_pointer(record: peer_pb2.TaskRecord) -> bool:
    return bool(record.forwarded_to_dc) and not unconfirmed(record)
