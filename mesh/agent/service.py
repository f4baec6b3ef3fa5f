"""The gRPC edge: servicers that translate requests onto ``Agent`` and errors onto codes.

``MeshError`` subclasses carry their status code (``mesh.errors``); etcd trouble that
escapes as an aetcd error is UNAVAILABLE; anything else is a bug, logged with its
traceback and answered INTERNAL without details, never a crashed agent.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh import metrics
from mesh.agent.agent import Agent
from mesh.agent.peers import channel_options
from mesh.core.task import admit, public
from mesh.errors import InvalidTask, MeshError, TaskConflict
from mesh.store.etcd import ETCD_ERRORS
from mesh.store.registry import AgentRecord
from mesh.v1 import peer_pb2, peer_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

R = TypeVar("R")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, MeshError):
        return grpc.StatusCode[exc.code], str(exc)
    if isinstance(exc, ETCD_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, f"etcd unavailable: {exc}"
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


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


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @unary
    async def Submit(self, request, context):
        try:
            admitted = admit(
                request.spec, self.agent.cfg, self.agent.known_pipelines(), int(time.time() * 1000)
            )
            stored, created = await self.agent.placement.submit(admitted)
        except MeshError as exc:
            metrics.REJECTED.labels(exc.code).inc()
            raise
        if not created and stored.record.spec_digest != admitted.digest:
            raise TaskConflict(
                "task_id already used by a different task", task_id=admitted.spec.task_id
            )
        return pb.SubmitResponse(status=public(stored.status), existing=not created)

    @unary
    async def Get(self, request, context):
        return await self.agent.get(request.task_id)

    async def Watch(self, request, context) -> AsyncIterator[pb.TaskEvent]:
        previous = None
        try:
            async for status in self.agent.follow(request.task_id):
                kind = (
                    pb.TaskEvent.KIND_PROGRESS
                    if previous is not None and status.state == previous
                    else pb.TaskEvent.KIND_STATE
                )
                previous = status.state
                yield pb.TaskEvent(kind=kind, status=status)
        except Exception as exc:
            code, message = status_for(exc)
            await context.abort(code, message)

    @unary
    async def Cancel(self, request, context):
        return await self.agent.cancel(request.task_id, request.reason)

    @unary
    async def List(self, request, context):
        limit = min(request.limit or self.agent.cfg.max_list, self.agent.cfg.max_list)
        tasks, truncated = await self.agent.store.list(
            user_id=request.user_id, state=request.state, limit=limit
        )
        return pb.ListResponse(tasks=tasks, truncated=truncated)


class AgentServicer(tasks_pb2_grpc.AgentServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _info(self, a: AgentRecord) -> pb.AgentInfo:
        running, queued = self.agent.router.load(a.agent_id)
        return pb.AgentInfo(
            agent_id=a.agent_id,
            dc=a.dc,
            address=a.address,
            gpus=[
                pb.Gpu(
                    index=g.index,
                    uuid=g.uuid,
                    name=g.name,
                    memory_mb=g.memory_mb,
                    gpu_class=g.gpu_class,
                )
                for g in a.gpus
            ],
            weight=a.weight,
            pipelines=a.pipelines,
            models=a.models,
            models_loaded=a.models_loaded,
            state=a.state,
            incarnation=a.incarnation,
            running=running,
            queued=queued,
            suspect=self.agent.router.is_suspect(a.agent_id),
        )

    @unary
    async def ListAgents(self, request, context):
        peers = sorted(self.agent.registry.peers.values(), key=lambda a: a.agent_id)
        return pb.ListAgentsResponse(agents=[self._info(a) for a in peers])

    @unary
    async def Queue(self, request, context):
        return await self.agent.queue()

    @unary
    async def Drain(self, request, context):
        await self.agent.drain_now()
        assert self.agent.registry.me is not None
        return self._info(self.agent.registry.me)

    @unary
    async def Route(self, request, context):
        if not request.spec.model or not request.spec.pipeline:
            raise InvalidTask("model and pipeline are required to route")
        decision = self.agent.placement.route(request.spec, explain=request.explain)
        return pb.RouteResponse(
            agent_id=self.agent.cfg.agent_id,
            dc=self.agent.cfg.dc,
            bound=decision.bound,
            targets=[pb.RouteTarget(**t._asdict()) for t in decision.targets],
            candidates=[
                pb.RouteCandidate(
                    agent_id=c.agent_id,
                    tasks=c.tasks,
                    max_tasks=c.max_tasks,
                    eligible=c.eligible,
                    model_loaded=c.loaded,
                    verdict=c.verdict,
                )
                for c in decision.candidates
            ],
        )


class PeerServicer(peer_pb2_grpc.PeerServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @unary
    async def Offer(self, request, context):
        accepted, reason = await self.agent.placement.offer(request)
        return peer_pb2.OfferResponse(accepted=accepted, reason=reason, load=self.agent.load())

    @unary
    async def Summary(self, request, context):
        return await self.agent.summary_received(request)

    @unary
    async def CancelLocal(self, request, context):
        return await self.agent.cancel_local(request.task_id, request.reason)


SERVICE_NAMES = (
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    tasks_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    peer_pb2.DESCRIPTOR.services_by_name["PeerService"].full_name,
)


class Server:
    """The agent's gRPC port: the mesh services, health and reflection."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(options=channel_options(agent.cfg.max_message_bytes))
        tasks_pb2_grpc.add_TaskServiceServicer_to_server(TaskServicer(agent), self.grpc)
        tasks_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(agent), self.grpc)
        peer_pb2_grpc.add_PeerServiceServicer_to_server(PeerServicer(agent), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )

    async def start(self) -> str:
        """Bind, start the agent, and return the address peers should dial."""
        port = self.grpc.add_insecure_port(self.agent.cfg.listen)
        if port == 0:
            raise MeshError(f"cannot listen on {self.agent.cfg.listen}")
        await self.grpc.start()
        host = self.agent.cfg.listen.rpartition(":")[0]
        address = self.agent.cfg.advertise or f"{host}:{port}"
        await self.agent.start(address)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return address

    async def stop(self, grace_s: float) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.agent.stop(grace_s)
        await self.grpc.stop(1.0)
