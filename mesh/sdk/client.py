"""The mesh as its users see it: ``AsyncClient`` and the ``Task`` handles it returns.

A client is given a few agents of one DC and credentials (``mesh.channels.Security``: a
token for the agents' API ports, or a certificate for their mTLS ports). It learns the
DC's agents from ``ListAgents`` (again every ``refresh_s``, and after a failure), balances
calls over the healthy ones, and rides through an agent's death or drain:

- a call that finds its agent gone (``UNAVAILABLE``), or that one agent does not answer in
  ``try_timeout_s``, is tried on another, up to ``tries`` agents; only calls that are safe
  to repeat are repeated, and a Submit is: it always carries its task id, the idempotency
  key, so a retried Submit returns the task the first try made rather than a second one;
- a watch whose agent dies resumes on another from the last event it saw (its resume
  token): no event is lost or repeated, and it ends with the task's terminal event;
- ``submit_many`` sends many tasks over one stream, and when the stream breaks sends the
  tasks not yet answered for good over a stream to another agent: their ids make the
  Submits safe to repeat, and each task is answered (and, followed, ended) once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from mesh.channels import Security
from mesh.client import MeshClient
from mesh.core.task import TERMINAL
from mesh.errors import MeshError
from mesh.sdk.errors import (
    DeadlineExceeded,
    TaskCancelled,
    TaskFailed,
    Unavailable,
    error_named,
    error_of,
)
from mesh.sdk.picker import Picker
from mesh.v1 import tasks_pb2 as pb

T = TypeVar("T")
BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
# A call that timed out may have been applied: retried only when repeating it is safe.
RETRYABLE_IF_SAFE = {grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class Answer:
    """What ``submit_many`` says of one task: recorded (``status`` as Submit answered it),
    refused (``error``, typed as a call's would be), or, followed, ended (``ended``, with
    its terminal ``status``)."""

    task_id: str
    status: pb.TaskStatus | None = None
    error: MeshError | None = None
    ended: bool = False


class AsyncClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        security: Security,
        *,
        try_timeout_s: float = 5.0,
        tries: int = 6,
        refresh_s: float = 10.0,
        watch_patience_s: float = 90.0,
        discover: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``endpoints``: agents to start from (of the port ``security`` fits); with
        ``discover`` off, the only ones used (a load balancer's address, say)."""
        if not endpoints:
            raise ValueError("a client needs at least one agent to start from")
        self.security = security
        self._picker = Picker(tuple(endpoints))
        self._try_timeout_s = try_timeout_s
        self._tries = tries
        self._refresh_s = refresh_s
        self._watch_patience_s = watch_patience_s
        self._clock = clock
        self._clients: dict[str, MeshClient] = {}
        self._refreshed = float("-inf") if discover else float("inf")

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    # -- the mesh ------------------------------------------------------------------------

    async def submit(
        self,
        pipeline: str,
        model: str,
        *,
        payload: bytes = b"",
        params: Mapping[str, str] | None = None,
        task_id: str = "",
        task_type: int = pb.TASK_TYPE_CUSTOM,
        queue: str = "",
        timeout_s: float | None = None,
        affinity_key: str = "",
        gpu_count: int = 1,
        min_gpu_memory_mb: int = 0,
        group: str = "",
    ) -> Task:
        """Submit a task; ``task_id`` is the idempotency key (a fresh one if empty)."""
        spec = pb.TaskSpec(
            task_id=task_id,
            user=pb.User(group=group),
            task_type=task_type,
            pipeline=pipeline,
            model=model,
            queue=queue,
            payload=payload,
            params=dict(params or {}),
            affinity_key=affinity_key,
            gpu_count=gpu_count,
            min_gpu_memory_mb=min_gpu_memory_mb,
        )
        if timeout_s is not None:
            spec.timeout.FromMilliseconds(int(timeout_s * 1000))
        return await self.submit_spec(spec)

    async def submit_spec(self, spec: pb.TaskSpec) -> Task:
        """Submit a spec as given, with a task id of its own if it has none."""
        if not spec.task_id:
            spec.task_id = uuid.uuid4().hex
        reply = await self._call(lambda c: c.submit(spec, self._try_timeout_s), safe=True)
        return Task(self, reply.status.task_id, reply.status)

    async def submit_many(
        self, specs: Iterable[pb.TaskSpec], *, follow: bool = False
    ) -> AsyncIterator[Answer]:
        """Submit every spec over one stream (ids given where missing), answering each
        as the mesh does; with ``follow``, each task's end too. The specs are read as the
        stream has room, so a generator of millions is fine."""
        source = iter(specs)
        pending: dict[str, pb.TaskSpec] = {}  # sent, not yet answered for good
        answered: set[str] = set()
        failures = 0
        while True:
            await self._refresh()
            address = self._picker.pick(self._clock())
            again, drained = list(pending.values()), False

            def requests(again: list[pb.TaskSpec] = again) -> Iterable[pb.SubmitStreamRequest]:
                nonlocal drained
                for spec in again:
                    yield pb.SubmitStreamRequest(spec=spec, ref=spec.task_id, follow=follow)
                for spec in source:
                    spec.task_id = spec.task_id or uuid.uuid4().hex
                    pending[spec.task_id] = spec
                    yield pb.SubmitStreamRequest(spec=spec, ref=spec.task_id, follow=follow)
                drained = True

            try:
                async for reply in self._client(address).submit_stream(requests()):
                    failures = 0
                    for answer in _answers(reply, follow, pending, answered):
                        yield answer
                if drained and not pending:
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise error_of(exc) from None
                self._picker.failed(address, self._clock())
            failures += 1  # broken, or ended with tasks unanswered: on, elsewhere
            if failures > self._tries:
                raise Unavailable(f"no agent took the stream of {len(pending)} tasks")
            await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
            await self._refresh(force=True)

    def task(self, task_id: str) -> Task:
        """A handle on a task submitted before (by this client or another)."""
        return Task(self, task_id)

    async def agents(self) -> list[pb.AgentInfo]:
        return await self._call(lambda c: c.agents(self._try_timeout_s), safe=True)

    async def list(
        self, *, state: int = 0, user: str = "", page_size: int = 0
    ) -> AsyncIterator[pb.TaskStatus]:
        """Every task that matches, page after page."""
        token = ""
        while True:
            page = await self._call(
                lambda c, t=token: c.list(user, state, page_size, t, self._try_timeout_s),
                safe=True,
            )
            for status in page.tasks:
                yield status
            token = page.next_page_token
            if not token:
                return

    # -- calls that ride through deaths --------------------------------------------------

    def _client(self, address: str) -> MeshClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = MeshClient(address, self.security)
        return client

    async def _refresh(self, force: bool = False) -> None:
        """Learn the DC's healthy agents, from the first agent that answers."""
        if not force and self._clock() - self._refreshed < self._refresh_s:
            return
        self._refreshed = self._clock()
        mtls = self.security.cert is not None
        for address in self._picker.to_ask:
            try:
                infos = await self._client(address).agents(self._try_timeout_s)
            except grpc.aio.AioRpcError:
                continue
            healthy = [i for i in infos if i.state == "active" and not i.suspect]
            self._picker.update(i.mtls_address if mtls else i.address for i in healthy)
            return

    async def _call(self, call: Callable[[MeshClient], Awaitable[T]], *, safe: bool) -> T:
        """``call`` on one agent after another until one answers; ``safe``: repeating
        it cannot do the work twice (reads, cancels, a Submit with its id)."""
        await self._refresh()
        tried: list[str] = []
        failure: grpc.aio.AioRpcError | None = None
        for attempt in range(self._tries):
            address = self._picker.pick(self._clock(), tried)
            tried.append(address)
            try:
                return await call(self._client(address))
            except grpc.aio.AioRpcError as exc:
                if not (exc.code() in RETRYABLE or (safe and exc.code() in RETRYABLE_IF_SAFE)):
                    raise error_of(exc) from None
                failure = exc
                self._picker.failed(address, self._clock())
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            await self._refresh(force=True)
        assert failure is not None
        raise error_of(failure) from None

    async def _watch(self, task_id: str) -> AsyncIterator[pb.TaskEvent]:
        """A watch rides through deaths, drains and outages: it resumes on another agent
        after any break, and gives up only after ``watch_patience_s`` with no event
        (longer than a DC's etcd takes to come back)."""
        token = ""
        failures = 0
        quiet_since = self._clock()
        while True:
            await self._refresh()
            address = self._picker.pick(self._clock())
            try:
                async for event in self._client(address).watch(task_id, resume_token=token):
                    failures, quiet_since = 0, self._clock()
                    token = event.resume_token
                    yield event
                    if event.status.state in TERMINAL:
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise error_of(exc) from None
                self._picker.failed(address, self._clock())
            if self._clock() - quiet_since > self._watch_patience_s:
                raise Unavailable(f"no agent could follow task {task_id}")
            failures += 1  # broken, or ended before the task did: resume elsewhere
            await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
            await self._refresh(force=True)


def _answers(
    reply: pb.SubmitStreamResponse, follow: bool, pending: dict[str, pb.TaskSpec], seen: set[str]
) -> list[Answer]:
    """What one of the stream's answers tells the caller (none for an answer repeated by
    a stream that took the task again), and which tasks it settles for good."""
    ref, kind = reply.ref, reply.WhichOneof("answer")
    if ref not in pending:
        return []  # settled already, on an earlier stream
    if kind == "error":
        del pending[ref]
        return [Answer(ref, error=error_named(reply.error.code, reply.error.message))]
    if kind == "ended":
        del pending[ref]
        return [Answer(ref, status=reply.ended, ended=True)]
    if not follow:
        del pending[ref]
    if ref in seen:
        return []
    seen.add(ref)
    return [Answer(ref, status=reply.submitted.status)]


class Task:
    """A task, as its submitter follows it. ``wait`` and ``result`` take ``timeout`` as
    ``concurrent.futures.Future.result`` does, so the sync and async handles read alike."""

    def __init__(
        self, client: AsyncClient, task_id: str, status: pb.TaskStatus | None = None
    ) -> None:
        self._client = client
        self.task_id = task_id
        self.last = status  # the last status this handle saw

    async def status(self) -> pb.TaskStatus:
        self.last = await self._client._call(
            lambda c: c.get(self.task_id, self._client._try_timeout_s), safe=True
        )
        return self.last

    async def watch(self) -> AsyncIterator[pb.TaskEvent]:
        """Its events until it ends: the first is its state now; none lost or repeated,
        whichever agents die meanwhile."""
        async for event in self._client._watch(self.task_id):
            self.last = event.status
            yield event

    async def wait(self, timeout: float | None = None) -> pb.TaskStatus:  # noqa: ASYNC109
        """Its terminal status (``DeadlineExceeded`` if ``timeout`` passes first)."""
        async with asyncio.timeout(timeout):
            async for event in self.watch():
                if event.status.state in TERMINAL:
                    return event.status
        raise AssertionError("a watch ends with the task's terminal event")

    async def result(self, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        """Its result, inline or fetched from the agent that stored it; ``TaskFailed`` or
        ``TaskCancelled`` if it ended without one."""
        try:
            status = await self.wait(timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"task {self.task_id} did not end in {timeout}s") from None
        if status.state == pb.TASK_STATE_CANCELLED:
            raise TaskCancelled(status)
        if status.state != pb.TASK_STATE_SUCCEEDED:
            raise TaskFailed(status)

        async def fetch(client: MeshClient) -> bytes:
            return b"".join([chunk.data async for chunk in client.result(self.task_id)])

        return await self._client._call(fetch, safe=True)

    async def rerun(self, task_id: str = "") -> Task:
        """Run this finished task again as a new task (``task_id``: its id, and the
        idempotency key of the rerun; a fresh one if empty), with its spec and payload."""
        new_id = task_id or uuid.uuid4().hex
        client = self._client
        reply = await client._call(
            lambda c: c.rerun(self.task_id, new_id, client._try_timeout_s), safe=True
        )
        return Task(client, reply.status.task_id, reply.status)

    async def cancel(self, reason: str = "") -> pb.TaskStatus:
        self.last = await self._client._call(
            lambda c: c.cancel(self.task_id, reason, self._client._try_timeout_s), safe=True
        )
        return self.last
