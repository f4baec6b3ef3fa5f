"""What an agent offers the outside world, in one narrow facade.

Each method takes and returns the API's protobuf messages, so an edge (the gRPC
servicers, the HTTP gateway) only translates transport to message and ``MeshError`` to
status: it never reaches into the agent's parts. The facade is the one place that knows
which part answers what.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from mesh import metrics
from mesh.agent.dispatch import describe
from mesh.core.clock import now_ms
from mesh.core.task import admit, public
from mesh.errors import InvalidTask, MeshError, TaskConflict
from mesh.store.registry import AgentRecord
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

if TYPE_CHECKING:
    from mesh.agent.agent import Agent

T = TypeVar("T")


class AgentApi:
    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._unfinished: set[asyncio.Task[Any]] = set()

    def _to_the_end(self, work: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run ``work`` to its end even if the caller goes away meanwhile.

        gRPC cancels a handler whose client disconnects or times out; a Submit or an
        Offer cancelled between recording a task and placing it would leave a record
        that nobody places. The caller still gets the answer if it is still there.
        """
        task = asyncio.ensure_future(work)
        self._unfinished.add(task)
        task.add_done_callback(self._finished)
        return asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._unfinished.discard(task)
        if not task.cancelled():
            task.exception()  # seen: nobody may be left to await it

    # -- TaskService ---------------------------------------------------------------------

    async def submit(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        return await self._to_the_end(self._submit(request))

    async def _submit(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        agent = self._agent
        try:
            admitted = admit(request.spec, agent.cfg, self._known_pipelines(), now_ms())
            stored, created = await agent.submission.submit(admitted)
        except MeshError as exc:
            metrics.REJECTED.labels(exc.code).inc()
            raise
        if not created and stored.record.spec_digest != admitted.digest:
            raise TaskConflict(
                "task_id already used by a different task", task_id=admitted.spec.task_id
            )
        return pb.SubmitResponse(status=public(stored.status), existing=not created)

    def _known_pipelines(self) -> set[str]:
        known = set(self._agent.pipelines)
        for peer in self._agent.registry.peers.values():
            known.update(peer.pipelines)
        return known

    async def get(self, request: pb.GetRequest) -> pb.TaskStatus:
        return await self._agent.tasks.get(request.task_id)

    async def watch(self, request: pb.WatchRequest) -> AsyncIterator[pb.TaskEvent]:
        """The task's events until it ends: the first is its state now; a status in the
        same state as the one before is progress."""
        previous = None
        async for status in self._agent.tasks.follow(request.task_id):
            kind = (
                pb.TaskEvent.KIND_PROGRESS
                if previous is not None and status.state == previous
                else pb.TaskEvent.KIND_STATE
            )
            previous = status.state
            yield pb.TaskEvent(kind=kind, status=status)

    async def cancel(self, request: pb.CancelRequest) -> pb.TaskStatus:
        return await self._agent.tasks.cancel(request.task_id, request.reason)

    async def list(self, request: pb.ListRequest) -> pb.ListResponse:
        most = self._agent.cfg.max_list
        tasks, truncated = await self._agent.tasks.list(
            user_id=request.user_id, state=request.state, limit=min(request.limit or most, most)
        )
        return pb.ListResponse(tasks=tasks, truncated=truncated)

    # -- AgentService --------------------------------------------------------------------

    async def list_agents(self, request: pb.ListAgentsRequest) -> pb.ListAgentsResponse:
        peers = sorted(self._agent.registry.peers.values(), key=lambda a: a.agent_id)
        return pb.ListAgentsResponse(agents=[self._info(a) for a in peers])

    def _info(self, a: AgentRecord) -> pb.AgentInfo:
        router = self._agent.view.router
        running, queued = router.load(a.agent_id)
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
            suspect=router.is_suspect(a.agent_id),
        )

    async def route(self, request: pb.RouteRequest) -> pb.RouteResponse:
        if not request.spec.model or not request.spec.pipeline:
            raise InvalidTask("model and pipeline are required to route")
        agent = self._agent
        decision = agent.placement.route(request.spec, explain=request.explain)
        return pb.RouteResponse(
            agent_id=agent.cfg.agent_id,
            dc=agent.cfg.dc,
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

    async def queue(self, request: pb.QueueRequest) -> pb.QueueResponse:
        agent = self._agent
        return await describe(agent.client, agent.keys, list(agent.cfg.queues))

    async def drain(self, request: pb.DrainRequest) -> pb.AgentInfo:
        return self._info(await self._agent.drain())

    # -- PeerService ---------------------------------------------------------------------

    async def offer(self, request: peer_pb2.Envelope) -> peer_pb2.OfferResponse:
        accepted, reason = await self._to_the_end(self._agent.intake.offer(request))
        return peer_pb2.OfferResponse(
            accepted=accepted, reason=reason, load=self._agent.view.load()
        )

    async def summary(self, request: peer_pb2.DcSummary) -> peer_pb2.DcSummary:
        return await self._agent.speaker.received(request)

    async def settle(self, request: peer_pb2.SettleRequest) -> peer_pb2.SettleResponse:
        return await self._to_the_end(self._agent.intake.settle(request))

    async def cancel_local(self, request: pb.CancelRequest) -> pb.TaskStatus:
        return await self._agent.tasks.cancel_local(request.task_id, request.reason)
