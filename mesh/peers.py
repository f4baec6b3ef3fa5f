"""gRPC channels to peer agents, one per address, shared by every call to that peer."""

from __future__ import annotations

import grpc

from mesh.v1 import peer_pb2, peer_pb2_grpc, tasks_pb2


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


class PeerClients:
    def __init__(self, max_message_bytes: int) -> None:
        self._options = channel_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> peer_pb2_grpc.PeerServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return peer_pb2_grpc.PeerServiceStub(channel)

    async def offer(
        self, address: str, envelope: peer_pb2.Envelope, timeout_s: float
    ) -> peer_pb2.OfferResponse:
        return await self._stub(address).Offer(envelope, timeout=timeout_s)

    async def cancel_local(
        self, address: str, request: tasks_pb2.CancelRequest, timeout_s: float
    ) -> tasks_pb2.TaskStatus:
        return await self._stub(address).CancelLocal(request, timeout=timeout_s)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
