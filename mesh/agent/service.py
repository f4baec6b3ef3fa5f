"""The gRPC edge: servicers that hand requests to the API facades and turn errors into codes
(``mesh.agent.status``), and the ``Server`` that opens the agent's ports: both gRPC ports
and the HTTP one (``mesh.agent.http.gateway``)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from mesh.agent.agent import Agent
from mesh.agent.agentapi import AgentApi
from mesh.agent.auth import Authenticator, caller
from mesh.agent.http.gateway import Gateway
from mesh.agent.peerapi import PeerApi
from mesh.agent.status import status_for
from mesh.agent.taskapi import TaskApi
from mesh.channels import server_options
from mesh.errors import ConfigError, MeshError
from mesh.v1 import peer_pb2, peer_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

R = TypeVar("R")
# Probes and the schema are not traced, and their stream handlers are coroutines that
# OpenTelemetry's aio interceptor cannot wrap (it expects async generators).
UNTRACED = filters.negate(
    filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
)


def unary(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except Exception as exc:
            code, message = status_for(exc)
            await context.abort(code, message)
            raise  # abort raises; this is never reached

    return wrapper


async def streamed(items: AsyncIterator[R], context: grpc.aio.ServicerContext) -> AsyncIterator[R]:
    """A server stream whose errors end it with their status, as ``unary`` does."""
    try:
        async for item in items:
            yield item
    except Exception as exc:
        code, message = status_for(exc)
        await context.abort(code, message)


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, api: TaskApi) -> None:
        self.api = api

    @unary
    async def Submit(self, request, context):
        return await self.api.submit(request, caller())

    async def SubmitStream(
        self, request_iterator, context
    ) -> AsyncIterator[pb.SubmitStreamResponse]:
        answers = self.api.submit_stream(request_iterator, caller())
        async for answer in streamed(answers, context):
            yield answer

    @unary
    async def Get(self, request, context):
        return await self.api.get(request, caller())

    async def Watch(self, request, context) -> AsyncIterator[pb.TaskEvent]:
        async for event in streamed(self.api.watch(request, caller()), context):
            yield event

    async def GetResult(self, request, context) -> AsyncIterator[pb.ResultChunk]:
        async for chunk in streamed(self.api.get_result(request, caller()), context):
            yield chunk

    @unary
    async def Cancel(self, request, context):
        return await self.api.cancel(request, caller())

    @unary
    async def Rerun(self, request, context):
        return await self.api.rerun(request, caller())

    @unary
    async def List(self, request, context):
        return await self.api.list(request, caller())


class AgentServicer(tasks_pb2_grpc.AgentServiceServicer):
    def __init__(self, api: AgentApi) -> None:
        self.api = api

    @unary
    async def ListAgents(self, request, context):
        return await self.api.list_agents(request, caller())

    @unary
    async def Queue(self, request, context):
        return await self.api.queue(request, caller())

    @unary
    async def Drain(self, request, context):
        return await self.api.drain(request, caller())

    @unary
    async def Undrain(self, request, context):
        return await self.api.undrain(request, caller())

    @unary
    async def SplitQuota(self, request, context):
        return await self.api.split_quota(request, caller())

    @unary
    async def Route(self, request, context):
        return await self.api.route(request, caller())


class PeerServicer(peer_pb2_grpc.PeerServiceServicer):
    def __init__(self, api: PeerApi) -> None:
        self.api = api

    @unary
    async def Offer(self, request, context):
        return await self.api.offer(request, caller())

    @unary
    async def Summary(self, request, context):
        return await self.api.summary(request, caller())

    @unary
    async def Settle(self, request, context):
        return await self.api.settle(request, caller())

    @unary
    async def Claim(self, request, context):
        return await self.api.claim(request, caller())

    async def FetchResult(self, request, context) -> AsyncIterator[pb.ResultChunk]:
        async for chunk in streamed(self.api.fetch_result(request, caller()), context):
            yield chunk

    @unary
    async def CancelLocal(self, request, context):
        return await self.api.cancel_local(request, caller())

    @unary
    async def RunStage(self, request, context):
        return await self.api.run_stage(request, caller(), context.time_remaining())


SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    tasks_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    peer_pb2.DESCRIPTOR.services_by_name["PeerService"].full_name,
)


class Server:
    """The agent's two gRPC ports: the mesh services, health and reflection on both.

    The API port is TLS and knows its callers by bearer token; the mTLS port demands a
    certificate of the mesh (agents, operators, users who hold one). grpcio cannot ask
    for a client certificate without requiring it, hence two ports rather than one (as
    Consul keeps its mTLS RPC port apart from its token-checked API). One interceptor
    serves both: it reads the certificate when there is one, the token otherwise.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.cfg
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            options=server_options(cfg.max_message_bytes),
            # OpenTelemetry's first: a call's span (and the caller's trace) is current
            # before anything else, so even a refused call is traced.
            interceptors=[
                aio_server_interceptor(filter_=UNTRACED),
                Authenticator(cfg.mesh_name, None if cfg.insecure else agent.parts.verifier),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        apis = agent.parts.apis
        verifier = None if cfg.insecure else agent.parts.verifier
        self.http = Gateway(cfg, apis, verifier) if cfg.http_listen else None
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(apis.tasks), self.grpc)
        tasks_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(apis.agents), self.grpc)
        peer_pb2_grpc.add_PeerServiceServicer_to_server(PeerServicer(apis.peers), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )

    def _bind(self, listen: str, mutual: bool) -> int:
        cfg = self.agent.cfg
        if cfg.insecure:
            port = self.grpc.add_insecure_port(listen)
        else:
            assert cfg.tls_ca and cfg.tls_cert and cfg.tls_key  # the config checked it
            try:
                pair = (cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())
                ca = cfg.tls_ca.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read TLS material: {exc}") from None
            credentials = grpc.ssl_server_credentials([pair], ca, require_client_auth=mutual)
            port = self.grpc.add_secure_port(listen, credentials)
        if port == 0:
            raise MeshError(f"cannot listen on {listen}")
        return port

    async def start(self) -> str:
        """Bind both ports, start the agent, and return the API address."""
        cfg = self.agent.cfg
        if cfg.insecure:
            log.warning("INSECURE: plaintext gRPC and etcd, and every caller may do anything")
        port = self._bind(cfg.listen, mutual=False)
        peer_port = self._bind(cfg.peer_listen, mutual=True)
        await self.grpc.start()
        address = cfg.advertise or f"{cfg.listen.rpartition(':')[0]}:{port}"
        peer = cfg.peer_advertise or f"{cfg.peer_listen.rpartition(':')[0]}:{peer_port}"
        if self.http is not None:
            assert cfg.http_listen
            self.agent.parts.membership.http_url = await self.http.start(cfg.http_listen)
        await self.agent.start(address, peer)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return address

    async def stop(self, grace_s: float) -> None:
        """Drain without an error for anyone: health says NOT_SERVING (balancers stop
        sending), the agent shows as draining and gives its queue away, and for
        ``drain_notice_s`` it still answers and forwards what reaches it; then running
        tasks get ``grace_s``, and the port closes last."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.agent.begin_drain()
        await asyncio.sleep(self.agent.cfg.drain_notice_s)
        await self.agent.stop(grace_s)
        await self.grpc.stop(1.0)
        if self.http is not None:
            await self.http.stop()
