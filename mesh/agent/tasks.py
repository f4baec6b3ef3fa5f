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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import grpc

from mesh.agent.executor import Executor
from mesh.agent.handoff import unconfirmed
from mesh.agent.peers import PeerClients
from mesh.agent.remote import RemoteDcs
from mesh.core.task import TERMINAL, public, state_name
from mesh.errors import NoResult, StaleWrite, TaskNotFound, Unavailable
from mesh.store.records import Page, TaskStore
from mesh.store.registry import Registry
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

CALL_TIMEOUT_S = 2.0
CHUNK_BYTES = 64 * 1024  # a peer's CancelLocal, and how long a cancelled run may take to unwind


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
        results: Path,
    ) -> None:
        """``backlog_changed`` wakes the DC's queue owner, if this agent is it;
        ``results`` is where this agent stores results too big for a record."""
        self._me = agent_id
        self._results = results
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

    async def follow(
        self, task_id: str, resume_token: str = ""
    ) -> AsyncGenerator[tuple[pb.TaskStatus, str]]:
        """The task's statuses until it ends, each with its resume token; from its DC's
        agents if it overflowed there. A token (``"<dc>:<revision>"``) resumes after the
        version it names, if the record still lives in that DC."""
        dc, _, revision = resume_token.partition(":")
        after = int(revision) if dc == self._registry.dc and revision.isdigit() else 0
        async for stored in self._store.follow(task_id, after):
            if confirmed_pointer(stored.record):
                elsewhere = stored.record.forwarded_to_dc
                async for event in self._remote.watch(elsewhere, task_id, resume_token):
                    yield event.status, event.resume_token
                return
            yield public(stored.status), f"{self._registry.dc}:{stored.revision}"

    async def list(self, *, user_id: str, state: int, limit: int, after: str) -> Page:
        return await self._store.list(user_id=user_id, state=state, limit=limit, after=after)

    async def result(self, task_id: str) -> AsyncIterator[pb.ResultChunk]:
        """The task's result in chunks: inline, or from the agent that stored it."""
        stored = await self._store.get(task_id)
        if confirmed_pointer(stored.record):
            async for chunk in self._remote.result(stored.record.forwarded_to_dc, task_id):
                yield chunk
            return
        status = stored.status
        if status.state != pb.TASK_STATE_SUCCEEDED or not status.HasField("result"):
            raise NoResult(f"no result: the task is {state_name(status.state)}", task_id=task_id)
        result = status.result
        if result.WhichOneof("body") == "inline":
            yield pb.ResultChunk(data=result.inline, media_type=result.media_type)
            return
        if status.agent == self._me:
            async for chunk in self.stored_result(task_id):
                yield chunk
            return
        peer = self._registry.peers.get(status.agent)
        if peer is None:
            raise Unavailable("the agent that stored the result is gone", agent=status.agent)
        try:
            async for chunk in self._peers.fetch_result(
                peer.peer_address, self._registry.dc, task_id
            ):
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"the agent that stored the result: {exc.code().name}") from exc

    async def stored_result(self, task_id: str) -> AsyncIterator[pb.ResultChunk]:
        """A result this agent stored, read from its result folder and nowhere else."""
        status = (await self._store.get(task_id)).status
        if status.agent != self._me or status.result.WhichOneof("body") != "uri":
            raise TaskNotFound("this agent stored no result of this task", task_id=task_id)
        media_type = status.result.media_type
        with await asyncio.to_thread(self._open_result, status.result.uri) as data:
            while chunk := await asyncio.to_thread(data.read, CHUNK_BYTES):
                yield pb.ResultChunk(data=chunk, media_type=media_type)
                media_type = ""

    def _open_result(self, uri: str) -> BinaryIO:
        path = Path(urlparse(uri).path).resolve()
        if path.parent != self._results.resolve():
            raise TaskNotFound("the result is not in this agent's result folder")
        return path.open("rb")

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
