"""A small Python client of the public API, used by meshctl, the demo and the tests.

Any gRPC language can do the same from ``proto/`` alone; this only saves Python callers
the channel options and the request wrapping.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable

from mesh.channels import Security, open_channel
from mesh.v1 import tasks_pb2 as pb
from mesh.v1 import tasks_pb2_grpc

DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024


class MeshClient:
    def __init__(
        self, endpoint: str, security: Security, max_message_bytes: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        """``security`` says how to reach the agent: the mesh's CA and a client certificate
        (for its mTLS port) or a token (for its API port)."""
        self.endpoint = endpoint
        self.channel = open_channel(endpoint, security, max_message_bytes)
        self.tasks = tasks_pb2_grpc.TaskServiceStub(self.channel)
        self.agents_stub = tasks_pb2_grpc.AgentServiceStub(self.channel)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def submit(self, spec: pb.TaskSpec, timeout_s: float = 10.0) -> pb.SubmitResponse:
        return await self.tasks.Submit(pb.SubmitRequest(spec=spec), timeout=timeout_s)

    async def get(self, task_id: str, timeout_s: float = 5.0) -> pb.TaskStatus:
        return await self.tasks.Get(pb.GetRequest(task_id=task_id), timeout=timeout_s)

    async def rerun(
        self, task_id: str, new_task_id: str = "", timeout_s: float = 10.0
    ) -> pb.SubmitResponse:
        request = pb.RerunRequest(task_id=task_id, new_task_id=new_task_id)
        return await self.tasks.Rerun(request, timeout=timeout_s)

    async def cancel(
        self, task_id: str, reason: str = "", timeout_s: float = 10.0
    ) -> pb.TaskStatus:
        return await self.tasks.Cancel(
            pb.CancelRequest(task_id=task_id, reason=reason), timeout=timeout_s
        )

    async def list(
        self,
        user_id: str = "",
        state: int = 0,
        limit: int = 0,
        page_token: str = "",
        timeout_s: float = 10.0,
    ) -> pb.ListResponse:
        request = pb.ListRequest(user_id=user_id, state=state, limit=limit, page_token=page_token)
        return await self.tasks.List(request, timeout=timeout_s)

    async def list_all(
        self, user_id: str = "", state: int = 0, timeout_s: float = 10.0
    ) -> list[pb.TaskStatus]:
        """Every page of ``list``, one after the other."""
        found: list[pb.TaskStatus] = []
        token = ""
        while True:
            page = await self.list(user_id, state, page_token=token, timeout_s=timeout_s)
            found.extend(page.tasks)
            token = page.next_page_token
            if not token:
                return found

    def watch(
        self, task_id: str, timeout_s: float | None = None, resume_token: str = ""
    ) -> AsyncIterator[pb.TaskEvent]:
        request = pb.WatchRequest(task_id=task_id, resume_token=resume_token)
        return self.tasks.Watch(request, timeout=timeout_s)

    def submit_stream(
        self, requests: AsyncIterable[pb.SubmitStreamRequest] | Iterable[pb.SubmitStreamRequest]
    ) -> AsyncIterator[pb.SubmitStreamResponse]:
        """Many Submits over one stream: the answers as they come (``SubmitStream``)."""
        return self.tasks.SubmitStream(requests)

    def result(self, task_id: str, timeout_s: float | None = None) -> AsyncIterator[pb.ResultChunk]:
        return self.tasks.GetResult(pb.GetResultRequest(task_id=task_id), timeout=timeout_s)

    async def route(
        self, spec: pb.TaskSpec, explain: bool = False, timeout_s: float = 5.0
    ) -> pb.RouteResponse:
        return await self.agents_stub.Route(
            pb.RouteRequest(spec=spec, explain=explain), timeout=timeout_s
        )

    async def queue(self, timeout_s: float = 5.0) -> pb.QueueResponse:
        return await self.agents_stub.Queue(pb.QueueRequest(), timeout=timeout_s)

    async def drain(self, timeout_s: float = 5.0) -> pb.AgentInfo:
        return await self.agents_stub.Drain(pb.DrainRequest(), timeout=timeout_s)

    async def undrain(self, timeout_s: float = 5.0) -> pb.AgentInfo:
        return await self.agents_stub.Undrain(pb.UndrainRequest(), timeout=timeout_s)

    async def split_quota(
        self, group: str, users: dict[str, int], remove: list[str], timeout_s: float = 10.0
    ) -> pb.QuotaSplit:
        request = pb.SplitQuotaRequest(group=group, users=users, remove=remove)
        return await self.agents_stub.SplitQuota(request, timeout=timeout_s)

    async def agents(self, timeout_s: float = 5.0) -> list[pb.AgentInfo]:
        reply = await self.agents_stub.ListAgents(pb.ListAgentsRequest(), timeout=timeout_s)
        return list(reply.agents)
