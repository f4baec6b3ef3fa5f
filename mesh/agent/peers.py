"""gRPC channels to other agents, one per (address, DC), shared by every call to it.

Agents reach each other on their mTLS ports, with their own certificates. Each channel
verifies that the agent it reaches belongs to the DC the caller means (its certificate
names ``<dc>.agent.<mesh>``), so an address learnt from another DC's summary can only
ever lead to one of that DC's agents. Peers of the DC are reached over ``PeerService``;
agents of other DCs also over ``TaskService``, for the tasks that overflowed there.

This is the agent's one gRPC client: a failed call leaves it as the mesh's error for its
status (``mesh.sdk.errors.error_of``, the table the SDK's users see too), so no other
agent module knows the transport. A stream the caller stops reading is cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

import grpc

from mesh.channels import Security, open_channel
from mesh.sdk.errors import error_of
from mesh.v1 import peer_pb2, peer_pb2_grpc, tasks_pb2, tasks_pb2_grpc

T = TypeVar("T")

# On an agent's calls to another DC's TaskService for the users it serves: the callee
# answers from its own DC and asks no further (in insecure mode, where no certificate
# says the caller is an agent, this says it).
FORWARDED = (("mesh-forwarded", "1"),)


class Peers(Protocol):
    """The peer port: calls to other agents, of this DC (``PeerService``) or another
    (``TaskService``, forwarded). Failures are the mesh's errors, by status. One real
    adapter (``PeerClients``); the simulator's calls the other agent in memory."""

    def watch(
        self, address: str, dc: str, task_id: str, resume_token: str = ""
    ) -> AsyncIterator[tasks_pb2.TaskEvent]: ...

    def result(
        self, address: str, dc: str, task_id: str
    ) -> AsyncIterator[tasks_pb2.ResultChunk]: ...

    def fetch_result(
        self, address: str, dc: str, task_id: str
    ) -> AsyncIterator[tasks_pb2.ResultChunk]: ...

    async def list(
        self, address: str, dc: str, request: tasks_pb2.ListRequest, timeout_s: float
    ) -> tasks_pb2.ListResponse: ...

    async def get(
        self, address: str, dc: str, task_id: str, timeout_s: float
    ) -> tasks_pb2.TaskStatus: ...

    async def cancel(
        self, address: str, dc: str, request: tasks_pb2.CancelRequest, timeout_s: float
    ) -> tasks_pb2.TaskStatus: ...

    async def rerun(
        self, address: str, dc: str, request: tasks_pb2.RerunRequest, timeout_s: float
    ) -> tasks_pb2.SubmitResponse: ...

    async def offer(
        self, address: str, dc: str, envelope: peer_pb2.Envelope, timeout_s: float
    ) -> peer_pb2.OfferResponse: ...

    async def summary(
        self, address: str, dc: str, mine: peer_pb2.DcSummary, timeout_s: float
    ) -> peer_pb2.DcSummary: ...

    async def settle(
        self, address: str, dc: str, request: peer_pb2.SettleRequest, timeout_s: float
    ) -> peer_pb2.SettleResponse: ...

    async def claim(
        self, address: str, dc: str, request: peer_pb2.ClaimRequest, timeout_s: float
    ) -> peer_pb2.ClaimResponse: ...

    async def run_stage(
        self, address: str, dc: str, request: peer_pb2.StageRequest, timeout_s: float
    ) -> peer_pb2.StageResponse: ...

    async def cancel_local(
        self, address: str, dc: str, request: tasks_pb2.CancelRequest, timeout_s: float
    ) -> tasks_pb2.TaskStatus: ...

    async def close(self) -> None: ...


class PeerClients:
    def __init__(self, security: Security, max_message_bytes: int) -> None:
        self._security = security
        self._max_message_bytes = max_message_bytes
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def _channel(self, address: str, dc: str) -> grpc.aio.Channel:
        channel = self._channels.get((address, dc))
        if channel is None:
            channel = open_channel(address, self._security, self._max_message_bytes, dc)
            self._channels[(address, dc)] = channel
        return channel

    def _stub(self, address: str, dc: str) -> peer_pb2_grpc.PeerServiceStub:
        return peer_pb2_grpc.PeerServiceStub(self._channel(address, dc))

    def _tasks(self, address: str, dc: str) -> tasks_pb2_grpc.TaskServiceStub:
        return tasks_pb2_grpc.TaskServiceStub(self._channel(address, dc))

    def watch(
        self, address: str, dc: str, task_id: str, resume_token: str = ""
    ) -> AsyncIterator[tasks_pb2.TaskEvent]:
        request = tasks_pb2.WatchRequest(task_id=task_id, resume_token=resume_token)
        return _streamed(self._tasks(address, dc).Watch(request, metadata=FORWARDED))

    def result(self, address: str, dc: str, task_id: str) -> AsyncIterator[tasks_pb2.ResultChunk]:
        """A task's result as an agent of another DC reads it where it is."""
        request = tasks_pb2.GetResultRequest(task_id=task_id)
        return _streamed(self._tasks(address, dc).GetResult(request, metadata=FORWARDED))

    def fetch_result(
        self, address: str, dc: str, task_id: str
    ) -> AsyncIterator[tasks_pb2.ResultChunk]:
        """A result stored on the agent of this DC at ``address``, read from its disk."""
        request = tasks_pb2.GetResultRequest(task_id=task_id)
        return _streamed(self._stub(address, dc).FetchResult(request))

    async def list(
        self, address: str, dc: str, request: tasks_pb2.ListRequest, timeout_s: float
    ) -> tasks_pb2.ListResponse:
        stub = self._tasks(address, dc)
        return await _unary(stub.List(request, timeout=timeout_s, metadata=FORWARDED))

    async def get(
        self, address: str, dc: str, task_id: str, timeout_s: float
    ) -> tasks_pb2.TaskStatus:
        request = tasks_pb2.GetRequest(task_id=task_id)
        stub = self._tasks(address, dc)
        return await _unary(stub.Get(request, timeout=timeout_s, metadata=FORWARDED))

    async def cancel(
        self, address: str, dc: str, request: tasks_pb2.CancelRequest, timeout_s: float
    ) -> tasks_pb2.TaskStatus:
        stub = self._tasks(address, dc)
        return await _unary(stub.Cancel(request, timeout=timeout_s, metadata=FORWARDED))

    async def rerun(
        self, address: str, dc: str, request: tasks_pb2.RerunRequest, timeout_s: float
    ) -> tasks_pb2.SubmitResponse:
        stub = self._tasks(address, dc)
        return await _unary(stub.Rerun(request, timeout=timeout_s, metadata=FORWARDED))

    async def offer(
        self, address: str, dc: str, envelope: peer_pb2.Envelope, timeout_s: float
    ) -> peer_pb2.OfferResponse:
        return await _unary(self._stub(address, dc).Offer(envelope, timeout=timeout_s))

    async def summary(
        self, address: str, dc: str, mine: peer_pb2.DcSummary, timeout_s: float
    ) -> peer_pb2.DcSummary:
        return await _unary(self._stub(address, dc).Summary(mine, timeout=timeout_s))

    async def settle(
        self, address: str, dc: str, request: peer_pb2.SettleRequest, timeout_s: float
    ) -> peer_pb2.SettleResponse:
        return await _unary(self._stub(address, dc).Settle(request, timeout=timeout_s))

    async def claim(
        self, address: str, dc: str, request: peer_pb2.ClaimRequest, timeout_s: float
    ) -> peer_pb2.ClaimResponse:
        return await _unary(self._stub(address, dc).Claim(request, timeout=timeout_s))

    async def run_stage(
        self, address: str, dc: str, request: peer_pb2.StageRequest, timeout_s: float
    ) -> peer_pb2.StageResponse:
        return await _unary(self._stub(address, dc).RunStage(request, timeout=timeout_s))

    async def cancel_local(
        self, address: str, dc: str, request: tasks_pb2.CancelRequest, timeout_s: float
    ) -> tasks_pb2.TaskStatus:
        return await _unary(self._stub(address, dc).CancelLocal(request, timeout=timeout_s))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


async def _unary(call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise error_of(exc) from exc


async def _streamed(call: Any) -> AsyncIterator[Any]:
    """The items of a streaming call; its failure as the mesh's error; cancelled when
    the reader stops early (else the call lives on until collected)."""
    try:
        async for item in call:
            yield item
    except grpc.aio.AioRpcError as exc:
        raise error_of(exc) from exc
    finally:
        call.cancel()
