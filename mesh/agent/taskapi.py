"""TaskService as the agent answers it: submit, read, watch, fetch, cancel, re-run and
list tasks, each checked against the caller's grant (a user sees only its own tasks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable

from mesh import metrics, tracing
from mesh.agent import streams
from mesh.agent.addressing import Addressing
from mesh.agent.api import (
    MAX_REASON,
    USER_NAME,
    ToTheEnd,
    forwards,
    may_ask_online,
    may_see,
    owner_of,
    until_set,
)
from mesh.agent.cancels import Cancels
from mesh.agent.reruns import Reruns
from mesh.agent.submission import Submission
from mesh.agent.tasks import Tasks
from mesh.config import AgentConfig
from mesh.core.access import Grant, PermissionDenied, may_queue
from mesh.core.clock import now_ms
from mesh.core.task import admit, check_id, page_start, page_token, public, resume_point
from mesh.errors import InvalidTask, MeshError, TaskConflict
from mesh.v1 import tasks_pb2 as pb


class TaskApi:
    def __init__(
        self,
        cfg: AgentConfig,
        known_pipelines: Callable[[], set[str]],
        addressing: Addressing,
        submission: Submission,
        tasks: Tasks,
        cancels: Cancels,
        reruns: Reruns,
        leaving: asyncio.Event,
        to_the_end: ToTheEnd,
    ) -> None:
        """``leaving`` is set as the agent lets go of etcd: its streams end then."""
        self._cfg = cfg
        self._known_pipelines = known_pipelines
        self._addressing = addressing
        self._submission = submission
        self._tasks = tasks
        self._cancels = cancels
        self._reruns = reruns
        self._leaving = leaving
        self._to_the_end = to_the_end

    async def submit(self, request: pb.SubmitRequest, grant: Grant) -> pb.SubmitResponse:
        with metrics.SUBMIT_SECONDS.time():
            return await self._to_the_end(self._submit(request, grant))

    async def _submit(self, request: pb.SubmitRequest, grant: Grant) -> pb.SubmitResponse:
        if request.spec.rerun_of:
            raise InvalidTask("rerun_of is set by Rerun, not by a Submit")
        try:
            spec = pb.TaskSpec()
            spec.CopyFrom(request.spec)
            spec.user.CopyFrom(self._may_submit(spec, grant))
        except MeshError as exc:
            metrics.REJECTED.labels(exc.code).inc()
            raise
        return await self._submitted(spec)

    @staticmethod
    def _may_submit(spec: pb.TaskSpec, grant: Grant) -> pb.User:
        """Whose the task will be, once the caller may submit it as it is."""
        user = owner_of(spec.user, grant.identity)
        may_ask_online(spec, grant.identity)
        may_queue(grant.identity, spec.queue)
        return user

    async def _submitted(self, spec: pb.TaskSpec) -> pb.SubmitResponse:
        """Admit, record and place ``spec`` (its owner settled): the Submit's answer."""
        try:
            with tracing.TRACER.start_as_current_span("admit") as span:
                admitted = admit(
                    spec, self._cfg, self._known_pipelines(), now_ms(), self._addressing.new_id
                )
                span.set_attributes(
                    {"task.id": admitted.spec.task_id, "task.pipeline": spec.pipeline}
                )
                stored, created = await self._submission.submit(admitted)
        except MeshError as exc:
            metrics.REJECTED.labels(exc.code).inc()
            raise
        if not created and stored.record.spec_digest != admitted.digest:
            raise TaskConflict(
                "task_id already used by a different task", task_id=admitted.spec.task_id
            )
        return pb.SubmitResponse(status=public(stored.status), existing=not created)

    async def rerun(self, request: pb.RerunRequest, grant: Grant) -> pb.SubmitResponse:
        """A new task from a finished one's spec and payload, for its owner, who must be
        allowed to submit it now (its queue, its class) as a Submit of it would be."""
        check_id(request.task_id)
        if request.new_task_id:
            check_id(request.new_task_id)
        forward = forwards(grant)
        old = may_see(await self._tasks.get(request.task_id, forward), grant)
        if forward:  # asked by a user, not passed on by another agent (which checked)
            self._may_submit(old.spec, grant)
        with metrics.SUBMIT_SECONDS.time():
            return await self._to_the_end(self._reruns.rerun(request, forward, self._submitted))

    def submit_stream(
        self, requests: AsyncIterable[pb.SubmitStreamRequest], grant: Grant
    ) -> AsyncIterator[pb.SubmitStreamResponse]:
        """Submit each request as ``submit`` does, answering on the stream
        (``mesh.agent.streams``); a followed task's end is its watch's last event."""

        async def follow(task_id: str) -> AsyncIterator[pb.TaskStatus]:
            async for event in self.watch(pb.WatchRequest(task_id=task_id), grant):
                yield event.status

        return streams.submits(requests, lambda r: self.submit(r, grant), follow)

    async def get(self, request: pb.GetRequest, grant: Grant) -> pb.TaskStatus:
        check_id(request.task_id)
        return may_see(await self._tasks.get(request.task_id, forwards(grant)), grant)

    async def watch(self, request: pb.WatchRequest, grant: Grant) -> AsyncIterator[pb.TaskEvent]:
        """The task's events until it ends: the first is its state now; a status in the
        same state as the one before is progress."""
        check_id(request.task_id)
        resume_point(request.resume_token)  # INVALID_ARGUMENT unless the mesh's own
        previous = None
        follow = self._tasks.follow(request.task_id, request.resume_token, forwards(grant))
        async for status, resume_token in until_set(follow, self._leaving):
            may_see(status, grant)  # every event: a stream may move to another copy
            kind = (
                pb.TaskEvent.KIND_PROGRESS
                if previous is not None and status.state == previous
                else pb.TaskEvent.KIND_STATE
            )
            previous = status.state
            yield pb.TaskEvent(kind=kind, status=status, resume_token=resume_token)

    async def get_result(
        self, request: pb.GetResultRequest, grant: Grant
    ) -> AsyncIterator[pb.ResultChunk]:
        check_id(request.task_id)
        forward = forwards(grant)
        may_see(await self._tasks.get(request.task_id, forward), grant)
        async for chunk in self._tasks.result(request.task_id, forward):
            yield chunk

    async def cancel(self, request: pb.CancelRequest, grant: Grant) -> pb.TaskStatus:
        check_id(request.task_id)
        if len(request.reason) > MAX_REASON:
            raise InvalidTask(f"reason is longer than {MAX_REASON} characters")
        forward = forwards(grant)
        may_see(await self._tasks.get(request.task_id, forward), grant)
        return await self._cancels.cancel(request.task_id, request.reason, forward)

    async def list(self, request: pb.ListRequest, grant: Grant) -> pb.ListResponse:
        user = request.user_id
        if user and not USER_NAME.fullmatch(user):
            raise InvalidTask("user_id is no user name")
        if not grant.all_tasks:
            if user and user != grant.identity.name:
                raise PermissionDenied(f"{grant.identity} may list only its own tasks")
            user = grant.identity.name
        most = self._cfg.max_list
        page, unreachable = await self._tasks.list(
            user_id=user,
            state=request.state,
            limit=min(request.limit or most, most),
            after=page_start(request.page_token),
            forward=forwards(grant),
        )
        return pb.ListResponse(
            tasks=page.items,
            truncated=bool(page.last),
            next_page_token=page_token(page.last) if page.last else "",
            unreachable_dcs=unreachable,
        )
