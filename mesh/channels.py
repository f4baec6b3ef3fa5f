"""How anything reaches an agent: one ``Security`` and one ``open_channel`` for the agents
among themselves, ``meshctl`` and the SDK alike.

Every channel is TLS, verified against the mesh's CA. An agent's certificate is checked
against a name, not the address dialled: ``agent.<mesh>`` for any agent, or
``<dc>.agent.<mesh>`` when the caller means an agent of DC ``dc`` (so an address learnt
from another DC's summary can only ever be one of that DC's agents). A caller proves who
it is with its client certificate (to an agent's mTLS port) or a bearer token (to its API
port). ``insecure`` (plaintext, no identity) exists for the ``--insecure`` flag alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from mesh.errors import ConfigError
from mesh.trust.pki import agent_host

KEEPALIVE_MS = 5000  # a call whose agent stopped answering fails within twice this


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # Pings while a call is open: a watch on a paused or vanished agent breaks (and
        # resumes elsewhere) instead of waiting for ever.
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """An agent's server: the same caps, and the clients' pings welcome."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


@dataclass(frozen=True, slots=True)
class Security:
    """TLS material and an optional token, for dialling agents of mesh ``mesh``."""

    mesh: str = "gpumesh"
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    insecure: bool = False

    @classmethod
    def from_files(
        cls,
        mesh: str,
        ca: Path | None,
        cert: Path | None = None,
        key: Path | None = None,
        token: str | None = None,
    ) -> Security:
        if ca is None:
            raise ConfigError("TLS needs the mesh's CA certificate (ca file)")
        if (cert is None) != (key is None):
            raise ConfigError("a client certificate needs its key, and a key its certificate")
        try:
            return cls(
                mesh,
                ca.read_bytes(),
                cert.read_bytes() if cert else None,
                key.read_bytes() if key else None,
                token,
            )
        except OSError as exc:
            raise ConfigError(f"cannot read TLS material: {exc}") from None

    def with_token(self, token: str | None) -> Security:
        return replace(self, token=token)

    def credentials(self) -> grpc.ChannelCredentials:
        if self.ca is None:
            raise ConfigError("TLS needs the mesh's CA certificate")
        tls = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        if self.token:
            return grpc.composite_channel_credentials(
                tls, grpc.access_token_call_credentials(self.token)
            )
        return tls


def open_channel(
    address: str,
    security: Security,
    max_message_bytes: int,
    dc: str = "",
    extra: list[tuple[str, int | str]] | None = None,
) -> grpc.aio.Channel:
    """A channel to the agent at ``address`` (of DC ``dc``, when the caller needs one)."""
    options = channel_options(max_message_bytes) + list(extra or [])
    # Each call carries the current trace (W3C traceparent in its metadata); without a
    # tracer provider (meshctl, the SDK) this costs next to nothing.
    interceptors = aio_client_interceptors()
    if security.insecure:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    options.append(("grpc.ssl_target_name_override", agent_host(security.mesh, dc)))
    return grpc.aio.secure_channel(
        address, security.credentials(), options=options, interceptors=interceptors
    )


def agent_healthy(address: str, security: Security, timeout_s: float = 0.5) -> bool:
    """Whether the agent at ``address`` answers SERVING (health is open to any TLS caller)."""
    if security.insecure:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", agent_host(security.mesh))]
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(security.ca), options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
