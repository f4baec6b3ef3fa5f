"""Many Submits over one stream (``TaskService.SubmitStream``), for producers of many tasks.

A Submit per call pays a call's cost per task (its headers, its credential checked, its
stream opened); a stream pays it once. Each request is submitted exactly as a Submit is
(the same checks, the same idempotency by task id, run to its end even if the stream
breaks meanwhile), up to ``MAX_IN_FLIGHT`` at once: the stream reads no further request
until one of those is answered, so a fast producer is held back by the mesh, not queued
without bound in an agent's memory. A request refused gets an ``error`` answer of its own
and the stream goes on. With ``follow``, the task's terminal status comes on the stream
too (at most ``MAX_FOLLOWED`` followed at once per stream), so a producer need not watch
or poll each task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

from mesh.core.task import TERMINAL
from mesh.errors import InvalidTask, LimitExceeded, MeshError
from mesh.v1 import tasks_pb2 as pb

MAX_IN_FLIGHT = 64  # Submits of one stream under way at once
MAX_FOLLOWED = 10_000  # tasks one stream follows to their end at once
MAX_REF = 128

Submit = Callable[[pb.SubmitRequest], Awaitable[pb.SubmitResponse]]
Follow = Callable[[str], AsyncIterator[pb.TaskStatus]]  # a task's statuses until its end


def refused(ref: str, exc: Exception) -> pb.SubmitStreamResponse:
    """The answer for a request that failed with ``exc``: its code and message as a
    Submit's status would carry them (an error the mesh did not mean is INTERNAL)."""
    if isinstance(exc, MeshError):
        error = pb.TaskError(code=exc.code, message=str(exc)[:4096])
    else:
        error = pb.TaskError(code="INTERNAL", message="internal error")
    return pb.SubmitStreamResponse(ref=ref, error=error)


class _Stream:
    def __init__(self, submit: Submit, follow: Follow) -> None:
        self._submit = submit
        self._follow = follow
        self.answers: asyncio.Queue[pb.SubmitStreamResponse | None] = asyncio.Queue()
        self._room = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.work: set[asyncio.Task[None]] = set()
        self._followed = 0

    async def read(self, requests: AsyncIterable[pb.SubmitStreamRequest]) -> None:
        """Take every request and answer it; then wait for the answers still due."""
        try:
            async for request in requests:
                if (answer := self._checked(request)) is not None:
                    self.answers.put_nowait(answer)
                    continue
                await self._room.acquire()
                task = asyncio.create_task(self._one(request))
                self.work.add(task)
                task.add_done_callback(self.work.discard)
            while self.work:
                await asyncio.wait(set(self.work))
        finally:
            self.answers.put_nowait(None)

    def _checked(self, request: pb.SubmitStreamRequest) -> pb.SubmitStreamResponse | None:
        """A refusal before any work, or None (a follow counted)."""
        if len(request.ref) > MAX_REF:
            ref = request.ref[:MAX_REF]
            return refused(ref, InvalidTask(f"ref is longer than {MAX_REF} characters"))
        if request.follow:
            if self._followed >= MAX_FOLLOWED:
                limit = LimitExceeded("this stream follows too many tasks", max=MAX_FOLLOWED)
                return refused(request.ref, limit)
            self._followed += 1
        return None

    async def _one(self, request: pb.SubmitStreamRequest) -> None:
        ref = request.ref
        try:
            try:
                reply = await self._submit(pb.SubmitRequest(spec=request.spec))
            finally:
                self._room.release()
            self.answers.put_nowait(pb.SubmitStreamResponse(ref=ref, submitted=reply))
            if request.follow:
                async for status in self._follow(reply.status.task_id):
                    if status.state in TERMINAL:
                        self.answers.put_nowait(pb.SubmitStreamResponse(ref=ref, ended=status))
                        return
        except Exception as exc:  # this request's failure, told to it alone
            self.answers.put_nowait(refused(ref, exc))
        finally:
            if request.follow:
                self._followed -= 1


async def submits(
    requests: AsyncIterable[pb.SubmitStreamRequest], submit: Submit, follow: Follow
) -> AsyncIterator[pb.SubmitStreamResponse]:
    """The answers to ``requests``, each submitted with ``submit`` (and, if it asks,
    followed with ``follow``), as they come. The stream's own failure (its client's
    requests broke off) ends it; the Submits under way still run to their end."""
    stream = _Stream(submit, follow)
    reader = asyncio.create_task(stream.read(requests))
    try:
        while (answer := await stream.answers.get()) is not None:
            yield answer
        await reader  # the requests' own failure, if any, is the stream's
    finally:
        reader.cancel()
        for task in list(stream.work):
            task.cancel()
