"""gRPC channels to other agents, one per address, shared by every call to that agent.

Peers of the DC are reached over ``PeerService``; agents of other DCs also over the public
``TaskService``, to answer Get, Watch and Cancel for tasks that overflowed there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mesh.channels import channel_options
from mesh.v1 import peer_pb2, peer_pb2_grpc, tasks_pb2, tasks_pb2_grpc


class PeerClients:
    def __init__(self, max_message_bytes: int) -> None:
        self._options = channel_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def _stub(self, address: str) -> peer_pb2_grpc.PeerServiceStub:
        return peer_pb2_grpc.PeerServiceStub(self._channel(address))

    def tasks(self, address: str) -> tasks_pb2_grpc.TaskServiceStub:
        return tasks_pb2_grpc.TaskServiceStub(self._channel(address))

    def watch(self, address: str, task_id: str) -> AsyncIterator[tasks_pb2.TaskEvent]:
        return self.tasks(address).Watch(tasks_pb2.WatchRequest(task_id=task_id))

    async def offer(
        self, address: str, envelope: peer_pb2.Envelope, timeout_s: float
    ) -> peer_pb2.OfferResponse:
        return await self._stub(address).Offer(envelope, timeout=timeout_s)

    async def summary(
        self, address: str, mine: peer_pb2.DcSummary, timeout_s: float
    ) -> peer_pb2.DcSummary:
        return await self._stub(address).Summary(mine, timeout=timeout_s)

    async def settle(
        self, address: str, request: peer_pb2.SettleRequest, timeout_s: float
    ) -> peer_pb2.SettleResponse:
        return await self._stub(address).Settle(request, timeout=timeout_s)

    async def cancel_local(
        self, address: str, request: tasks_pb2.CancelRequest, timeout_s: float
    ) -> tasks_pb2.TaskStatus:
        return await self._stub(address).CancelLocal(request, timeout=timeout_s)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
