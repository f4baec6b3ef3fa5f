"""Reading tasks, wherever they run: any agent answers for any task.

A task's record lives in its DC's etcd, so any agent of the DC answers ``Get``, ``Watch``
and ``List``; a record that only points to the DC the task overflowed to is followed
there through that DC's agents, once the hand-off is confirmed (until then the other DC
may not have it, and the record here answers). A task this DC has no record of is found
through its id's home (``mesh.agent.addressing``) and asked for in the DC that has it;
``List`` merges every DC's pages. An agent asked by another agent answers from its own
DC only (``forward`` off), so a question never travels in circles. Cancelling is
``mesh.agent.cancels``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from mesh.agent.addressing import Addressing
from mesh.agent.handoff import pointed_to
from mesh.agent.peers import Peers
from mesh.agent.remote import RemoteDcs
from mesh.core.listing import Page, merge
from mesh.core.task import (
    page_start,
    page_token,
    public,
    resume_point,
    state_name,
)
from mesh.errors import MeshError, NoResult, TaskNotFound, Unavailable
from mesh.store.records import Stored, TaskStore
from mesh.store.registry import Registry
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

CHUNK_BYTES = 64 * 1024


POINTER_RETRY_S = 1.0  # a pointer whose DC lacks the task: look here again after this
POINTER_MISSES = 5  # then the watch breaks (UNAVAILABLE): the caller resumes it


@dataclass(frozen=True)
class Reach:
    """How an agent reaches any task: its own id, its DC's records and members, its
    peers there, the other DCs, and where each id is homed."""

    agent_id: str
    store: TaskStore
    registry: Registry
    peers: Peers
    remote: RemoteDcs
    addressing: Addressing


class Tasks:
    def __init__(self, reach: Reach, results: Path, dcs: Callable[[], Iterable[str]]) -> None:
        """``results`` is where this agent stores results too big for a record; ``dcs``
        are the topology's DCs, which a list asks."""
        self._me = reach.agent_id
        self._results = results
        self._store = reach.store
        self._registry = reach.registry
        self._peers = reach.peers
        self._remote = reach.remote
        self._addressing = reach.addressing
        self._dcs = dcs

    async def get(self, task_id: str, forward: bool = True) -> pb.TaskStatus:
        try:
            stored = await self._store.get(task_id)
        except TaskNotFound:
            if not forward:
                raise
            _, status = await self._addressing.find(task_id)
            return status
        if dc := answered_by(stored.record):
            return await self._remote.get(dc, task_id)
        return public(stored.status)

    async def follow(
        self, task_id: str, resume_token: str = "", forward: bool = True
    ) -> AsyncGenerator[tuple[pb.TaskStatus, str]]:
        """The task's statuses until it ends, each with its resume token; from the DC
        that has it if that is not this one. A token (``"<dc>:<revision>"``) resumes
        after the version it names, if the record still lives in that DC.

        A record here that points to another DC is followed there (only when
        ``forward``: an agent that asks follows pointers itself, so two DCs never pass
        a watch back and forth). Should that DC not have the task (the hand-off was
        undone), the record here is followed again from the pointer on."""
        dc, revision = resume_point(resume_token)
        after = revision if dc == self._registry.dc else 0
        here = False  # whether this DC has a record of the task
        misses = 0  # answers "no such task" from the DC a pointer here names
        while True:
            elsewhere = ""
            try:
                async for stored in self._store.follow(task_id, after):
                    here, after = True, stored.revision
                    if elsewhere := answered_by(stored.record):
                        break
                    yield public(stored.status), f"{self._registry.dc}:{stored.revision}"
            except TaskNotFound:
                if not forward:
                    raise
                # Never here, or its record here was deleted under us (a hand-off taken
                # back by its origin): wherever the mesh has it now.
                elsewhere, _ = await self._addressing.find(task_id)
                here, after = False, 0
            if not elsewhere:
                return
            if not forward:
                raise TaskNotFound(f"the task lives in DC {elsewhere}", task_id=task_id)
            try:
                async for event in self._remote.watch(elsewhere, task_id, resume_token):
                    resume_token = event.resume_token
                    yield event.status, event.resume_token
                return
            except TaskNotFound:
                # That DC says it has no such task. With no record here, that is the
                # answer once it is said twice (a hand-off to this DC may have landed
                # since the record here was looked for). A pointer here is read again
                # from its current version, so a hand-off undone is followed here and
                # one still pointing there is asked again; never waited on in silence,
                # for a pointer that no longer changes would leave the watch mute.
                misses += 1
                if misses > (POINTER_MISSES if here else 1):
                    if not here:
                        raise
                    raise Unavailable(
                        f"DC {elsewhere} does not answer for the task its pointer names",
                        task_id=task_id,
                    ) from None
                after = 0
                await asyncio.sleep(POINTER_RETRY_S)

    async def list(
        self, *, user_id: str, state: int, limit: int, after: str, forward: bool = True
    ) -> tuple[Page[pb.TaskStatus], list[str]]:
        """One page of the tasks of every DC (``forward``) or of this one, and the DCs
        that did not answer."""
        mine = self._store.list(user_id=user_id, state=state, limit=limit, after=after)
        if not forward:
            return await mine, []
        others = sorted(set(self._dcs()) - {self._registry.dc})
        request = pb.ListRequest(
            user_id=user_id, state=state, limit=limit, page_token=page_token(after) if after else ""
        )
        answers = await asyncio.gather(
            mine, *(self._remote.list(dc, request) for dc in others), return_exceptions=True
        )
        if isinstance(answers[0], BaseException):
            raise answers[0]
        pages: list[Page[pb.TaskStatus]] = [answers[0]]
        unreachable = []
        for dc, answer in zip(others, answers[1:], strict=True):
            if isinstance(answer, MeshError):
                unreachable.append(dc)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                pages.append(Page(list(answer.tasks), page_start(answer.next_page_token)))
        return merge(pages, limit, key=lambda status: status.task_id), unreachable

    async def result(self, task_id: str, forward: bool = True) -> AsyncIterator[pb.ResultChunk]:
        """The task's result in chunks: inline, or from the agent that stored it."""
        here = await answering(self._store, self._addressing, task_id, forward)
        if isinstance(here, str):
            async for chunk in self._remote.result(here, task_id):
                yield chunk
            return
        status = here.status
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
        except MeshError as exc:
            raise Unavailable(f"the agent that stored the result: {exc.code}") from exc

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


def answered_by(record: peer_pb2.TaskRecord) -> str:
    """The DC that answers for the task when it is not this one: the one a confirmed
    pointer names (the task overflowed there), or the one that holds the id of a copy
    recorded here too (``superseded_by_dc``)."""
    return pointed_to(record) or record.superseded_by_dc


async def answering(
    store: TaskStore, addressing: Addressing, task_id: str, forward: bool
) -> Stored | str:
    """The record here, or the DC that answers for the task: the one a confirmed pointer
    names, or (``forward``) the one that has it when this DC has no record."""
    try:
        stored = await store.get(task_id)
    except TaskNotFound:
        if not forward:
            raise
        dc, _ = await addressing.find(task_id)
        return dc
    return answered_by(stored.record) or stored
