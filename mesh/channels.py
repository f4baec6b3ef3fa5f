"""gRPC channel settings every client of an agent uses: the agents among themselves,
``meshctl``, the SDK. One place, so a message cap or a reconnect back-off is the same
on every channel."""

from __future__ import annotations


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
