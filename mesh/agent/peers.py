"""gRPC channels to other agents, one per (address, DC), shared by every call to it.

Agents reach each other on their mTLS ports, with their own certificates. Each channel
verifies that the agent it reaches belongs to the DC the caller means (its certificate
names ``<dc>.agent.<mesh>``), so an address learnt from another DC's summary can only
ever lead to one of that DC's agents. Peers of the DC are reached over ``PeerService``;
agents of other DCs also over ``TaskService``, for the tasks that overflowed there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mesh.channels import Security, open_channel
from mesh.v1 import peer_pb2, peer_pb2_grpc, tasks_pb2, tasks_pb2_grpc

# On an agent's calls to another DC's TaskService for the users it serves: the callee
# answers from its own DC and asks no further (in insecure mode, where no certificate
# says the caller is an agent, this says it).
FORWARDED = (("mesh-forwarded", "1"),)


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

    def tasks(self, address: str, dc: str) -> tasks_pb2_grpc.TaskServiceStub:
        return tasks_pb2_grpc.TaskServiceStub(self._channel(address, dc))

    def watch(
        self, address: str, dc: str, task_id: str, resume_token: str = ""
    ) -> AsyncIterator[tasks_pb2.TaskEvent]:
        request = tasks_pb2.WatchRequest(task_id=task_id, resume_token=resume_token)
        return self.tasks(address, dc).Watch(request, metadata=FORWARDED)

    def fetch_result(
        self, address: str, dc: str, task_id: str
    ) -> AsyncIterator[tasks_pb2.ResultChunk]:
        return self._stub(address, dc).FetchResult(tasks_pb2.GetResultRequest(task_id=task_id))

    async def offer(
        self, address: str, dc: str, envelope: peer_pb2.Envelope, timeout_s: float
    ) -> peer_pb2.OfferResponse:
        return await self._stub(address, dc).Offer(envelope, timeout=timeout_s)

    async def summary(
        self, address: str, dc: str, mine: peer_pb2.DcSummary, timeout_s: float
    ) -> peer_pb2.DcSummary:
        return await self._stub(address, dc).Summary(mine, timeout=timeout_s)

    async def settle(
        self, address: str, dc: str, request: peer_pb2.SettleRequest, timeout_s: float
    ) -> peer_pb2.SettleResponse:
        return await self._stub(address, dc).Settle(request, timeout=timeout_s)

    async def claim(
        self, address: str, dc: str, request: peer_pb2.ClaimRequest, timeout_s: float
    ) -> peer_pb2.ClaimResponse:
        return await self._stub(address, dc).Claim(request, timeout=timeout_s)

    async def run_stage(
        self, address: str, dc: str, request: peer_pb2.StageRequest, timeout_s: float
    ) -> peer_pb2.StageResponse:
        return await self._stub(address, dc).RunStage(request, timeout=timeout_s)

    async def cancel_local(
        self, address: str, dc: str, request: tasks_pb2.CancelRequest, timeout_s: float
    ) -> tasks_pb2.TaskStatus:
        return await self._stub(address, dc).CancelLocal(request, timeout=timeout_s)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
