"""What an agent offers the outside world, in one narrow facade.

Each method takes and returns the API's protobuf messages, so an edge (the gRPC
servicers, the HTTP gateway) only translates transport to message and ``MeshError`` to
status: it never reaches into the agent's parts. The facade is the one place that knows
which part answers what.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from mesh import metrics, tracing
from mesh.agent.dispatch import describe
from mesh.core import classes
from mesh.core.access import (
    ANYONE,
    OPERATOR,
    READER,
    Grant,
    Identity,
    PermissionDenied,
    may_administer,
    may_queue,
)
from mesh.core.clock import now_ms
from mesh.core.task import (
    NAME,
    admit,
    check_id,
    page_start,
    page_token,
    public,
    resume_point,
)
from mesh.errors import InvalidTask, MeshError, TaskConflict, Unavailable
from mesh.store.quota import split_policy
from mesh.store.registry import AgentRecord
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

if TYPE_CHECKING:
    from mesh.agent.agent import Agent

log = logging.getLogger(__name__)

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

    async def submit(self, request: pb.SubmitRequest, grant: Grant) -> pb.SubmitResponse:
        with metrics.SUBMIT_SECONDS.time():
            return await self._to_the_end(self._submit(request, grant))

    async def _submit(self, request: pb.SubmitRequest, grant: Grant) -> pb.SubmitResponse:
        agent = self._agent
        try:
            spec = pb.TaskSpec()
            spec.CopyFrom(request.spec)
            spec.user.CopyFrom(owner_of(spec.user, grant.identity))
            may_ask_online(spec, grant.identity)
            may_queue(grant.identity, spec.queue)
            with tracing.TRACER.start_as_current_span("admit") as span:
                admitted = admit(
                    spec, agent.cfg, agent.known_pipelines(), now_ms(), agent.addressing.new_id
                )
                span.set_attributes(
                    {"task.id": admitted.spec.task_id, "task.pipeline": spec.pipeline}
                )
                stored, created = await agent.submission.submit(admitted)
        except MeshError as exc:
            metrics.REJECTED.labels(exc.code).inc()
            raise
        if not created and stored.record.spec_digest != admitted.digest:
            raise TaskConflict(
                "task_id already used by a different task", task_id=admitted.spec.task_id
            )
        return pb.SubmitResponse(status=public(stored.status), existing=not created)

    async def get(self, request: pb.GetRequest, grant: Grant) -> pb.TaskStatus:
        check_id(request.task_id)
        return may_see(await self._agent.tasks.get(request.task_id, forwards(grant)), grant)

    async def watch(self, request: pb.WatchRequest, grant: Grant) -> AsyncIterator[pb.TaskEvent]:
        """The task's events until it ends: the first is its state now; a status in the
        same state as the one before is progress."""
        check_id(request.task_id)
        resume_point(request.resume_token)  # INVALID_ARGUMENT unless the mesh's own
        previous = None
        follow = self._agent.tasks.follow(request.task_id, request.resume_token, forwards(grant))
        async for status, resume_token in until_set(follow, self._agent.leaving):
            may_see(status, grant)  # every event: a stream may move to another copy
            kind = (
                pb.TaskEvent.KIND_PROGRESS
                if previous is not None and status.state == previous
                else pb.TaskEvent.KIND_STATE
            )
            previous = status.state
            yield pb.TaskEvent(kind=kind, status=status, resume_token=resume_token)

    async def get_result(
        self, request: pb.GetResultRequest, grant: Grant
    ) -> AsyncIterator[pb.ResultChunk]:
        check_id(request.task_id)
        forward = forwards(grant)
        may_see(await self._agent.tasks.get(request.task_id, forward), grant)
        async for chunk in self._agent.tasks.result(request.task_id, forward):
            yield chunk

    async def fetch_result(
        self, request: pb.GetResultRequest, grant: Grant
    ) -> AsyncIterator[pb.ResultChunk]:
        speaks_for(grant, self._agent.cfg.dc, what="a result fetch")
        check_id(request.task_id)
        async for chunk in self._agent.tasks.stored_result(request.task_id):
            yield chunk

    async def cancel(self, request: pb.CancelRequest, grant: Grant) -> pb.TaskStatus:
        check_id(request.task_id)
        if len(request.reason) > MAX_REASON:
            raise InvalidTask(f"reason is longer than {MAX_REASON} characters")
        tasks, forward = self._agent.tasks, forwards(grant)
        may_see(await tasks.get(request.task_id, forward), grant)
        return await tasks.cancel(request.task_id, request.reason, forward)

    async def list(self, request: pb.ListRequest, grant: Grant) -> pb.ListResponse:
        user = request.user_id
        if user and not USER_NAME.fullmatch(user):
            raise InvalidTask("user_id is no user name")
        if not grant.all_tasks:
            if user and user != grant.identity.name:
                raise PermissionDenied(f"{grant.identity} may list only its own tasks")
            user = grant.identity.name
        most = self._agent.cfg.max_list
        page, unreachable = await self._agent.tasks.list(
            user_id=user,
            state=request.state,
            limit=min(request.limit or most, most),
            after=page_start(request.page_token),
            forward=forwards(grant),
        )
        return pb.ListResponse(
            tasks=page.items,
            truncated=bool(page.last),
            next_page_token=page_token(page.last) if page.last else "",
            unreachable_dcs=unreachable,
        )

    # -- AgentService --------------------------------------------------------------------

    async def list_agents(
        self, request: pb.ListAgentsRequest, grant: Grant
    ) -> pb.ListAgentsResponse:
        peers = sorted(self._agent.registry.peers.values(), key=lambda a: a.agent_id)
        agents = [self._info(a) for a in peers]
        if READER not in grant.identity.held:  # where to scrape: not a submitter's business
            for info in agents:
                info.ClearField("metrics_url")
        return pb.ListAgentsResponse(agents=agents)

    def _info(self, a: AgentRecord) -> pb.AgentInfo:
        agent = self._agent
        router = agent.view.router
        running, queued = router.load(a.agent_id)
        gossiped = agent.view.gossiper.table.get(a.agent_id)
        return pb.AgentInfo(
            agent_id=a.agent_id,
            dc=a.dc,
            address=a.address,
            mtls_address=a.peer_address,
            http_url=a.http_url,
            metrics_url=a.metrics_url,
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
            demand=agent.planning.demand_of(a.agent_id),
            models_planned=sorted(agent.planning.hosting_of(a.agent_id)),
            model_memory_mb=gossiped.model_mb if gossiped else 0,
        )

    async def route(self, request: pb.RouteRequest, grant: Grant) -> pb.RouteResponse:
        spec = request.spec
        if not (NAME.fullmatch(spec.model) and NAME.fullmatch(spec.pipeline)):
            raise InvalidTask("model and pipeline are required to route, as names")
        if len(spec.affinity_key) > MAX_AFFINITY or spec.gpu_count > MAX_GPUS:
            raise InvalidTask("affinity_key or gpu_count out of bounds")
        agent = self._agent
        decision = agent.placement.route(request.spec, explain=request.explain)
        user = owner_of(spec.user, grant.identity)
        quota = agent.quota.waits(user.id, user.group, max(1, spec.gpu_count))
        return pb.RouteResponse(
            agent_id=agent.cfg.agent_id,
            dc=agent.cfg.dc,
            bound=decision.bound,
            quota=quota or "",
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

    async def queue(self, request: pb.QueueRequest, grant: Grant) -> pb.QueueResponse:
        agent = self._agent
        reply = await describe(agent.client, agent.keys, list(agent.cfg.queues))
        now = now_ms()
        in_flight = agent.placement.handoffs.in_flight
        for dc, summary in sorted(agent.speaker.heard.items()):
            reply.remote.add(
                dc=dc,
                agents=summary.agents,
                slots=summary.slots,
                tasks=summary.tasks,
                capacity=summary.capacity,
                age_s=max(0.0, (now - summary.ts_unix_ms) / 1000),
                in_flight=in_flight.get(dc, 0),
                demand=summary.demand,
            )
        return reply

    async def drain(self, request: pb.DrainRequest, grant: Grant) -> pb.AgentInfo:
        log.warning("draining at the request of %s", grant.identity)
        return self._info(await self._agent.drain())

    async def undrain(self, request: pb.UndrainRequest, grant: Grant) -> pb.AgentInfo:
        log.warning("taken back into service at the request of %s", grant.identity)
        return self._info(await self._agent.undrain())

    async def split_quota(self, request: pb.SplitQuotaRequest, grant: Grant) -> pb.QuotaSplit:
        may_administer(grant.identity, request.group)
        if len(request.users) + len(request.remove) > MAX_SPLIT_USERS:
            raise InvalidTask(f"a split names at most {MAX_SPLIT_USERS} users")
        agent = self._agent
        tenants = await split_policy(
            agent.client, agent.keys, request.group, dict(request.users), list(request.remove)
        )
        log.warning("group %s split by %s", request.group, grant.identity)
        spec = tenants.groups[request.group]
        users = {
            u: limits.max_gpus for u, limits in spec.users.items() if limits.max_gpus is not None
        }
        return pb.QuotaSplit(
            group=request.group, dc=agent.cfg.dc, max_gpus=spec.max_gpus or 0, users=users
        )

    # -- PeerService ---------------------------------------------------------------------

    async def offer(self, request: peer_pb2.Envelope, grant: Grant) -> peer_pb2.OfferResponse:
        dc = self._agent.cfg.dc
        speaks_for(grant, request.origin_dc or dc, what="an offer")
        accepted, reason = await self._to_the_end(self._agent.intake.offer(request))
        return peer_pb2.OfferResponse(
            accepted=accepted, reason=reason, load=self._agent.view.load()
        )

    async def summary(self, request: peer_pb2.DcSummary, grant: Grant) -> peer_pb2.DcSummary:
        speaks_for(grant, request.dc, what="a summary")
        return await self._agent.speaker.received(request)

    async def settle(
        self, request: peer_pb2.SettleRequest, grant: Grant
    ) -> peer_pb2.SettleResponse:
        speaks_for(grant, request.origin_dc, what="a settle")
        return await self._to_the_end(self._agent.intake.settle(request))

    async def claim(self, request: peer_pb2.ClaimRequest, grant: Grant) -> peer_pb2.ClaimResponse:
        speaks_for(grant, request.dc, what="a claim")
        check_id(request.task_id)
        if len(request.spec_digest) > MAX_TOKEN or len(request.stale_holder) > MAX_TOKEN:
            raise InvalidTask("spec_digest or stale_holder out of bounds")
        return await self._to_the_end(self._agent.addressing.answer(request))

    async def run_stage(
        self, request: peer_pb2.StageRequest, grant: Grant, time_left_s: float | None
    ) -> peer_pb2.StageResponse:
        speaks_for(grant, self._agent.cfg.dc, what="a stage")  # a split stays in its DC
        return await self._agent.stages.serve(request, time_left_s)

    async def cancel_local(self, request: pb.CancelRequest, grant: Grant) -> pb.TaskStatus:
        speaks_for(grant, self._agent.cfg.dc, what="a local cancel")
        check_id(request.task_id)
        return await self._agent.tasks.cancel_local(request.task_id, request.reason[:MAX_REASON])


MAX_REASON = 1024
MAX_TOKEN = 128
MAX_AFFINITY = 256
MAX_GPUS = 64
MAX_SPLIT_USERS = 1000
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")


async def until_set(items: AsyncGenerator[T], leaving: asyncio.Event) -> AsyncIterator[T]:
    """``items`` until ``leaving`` is set, then ``Unavailable``: a stream on an agent
    that lets go of etcd ends with a status its client resumes from, not a broken read."""
    waiting = asyncio.ensure_future(leaving.wait())
    following: asyncio.Future[T] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(items))
            await asyncio.wait((following, waiting), return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():  # whatever the read gave: etcd may be gone under it
                raise Unavailable("this agent is leaving: watch again elsewhere from the token")
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:  # also when the caller went away: the read under way ends before the stream
        waiting.cancel()
        if following is not None and not following.done():
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        await items.aclose()


def owner_of(declared: pb.User, identity: Identity) -> pb.User:
    """Whose task this is: the caller's, never what the request says. A request may name
    the caller (and one of its groups); naming anyone else is refused."""
    if identity is ANYONE:
        return declared
    if declared.id and declared.id != identity.name:
        raise PermissionDenied(f"{identity} may not submit as {declared.id!r}")
    if declared.group and declared.group not in identity.groups:
        raise PermissionDenied(f"{identity} is not in group {declared.group!r}")
    if declared.role and declared.role not in identity.roles:
        raise PermissionDenied(f"{identity} does not hold role {declared.role!r}")
    group = declared.group or (identity.groups[0] if identity.groups else "")
    return pb.User(id=identity.name, group=group, role=declared.role)


def may_ask_online(spec: pb.TaskSpec, identity: Identity) -> None:
    """Online work is guaranteed GPUs and preempts batch: asking for it for a task type
    that is batch by default takes an operator."""
    if spec.task_class != pb.TASK_CLASS_ONLINE or identity is ANYONE:
        return
    default = pb.TaskSpec(task_type=spec.task_type)
    if classes.task_class(default) != classes.ONLINE and OPERATOR not in identity.held:
        raise PermissionDenied(
            f"{identity} may not run a {pb.TaskType.Name(spec.task_type)} task as online "
            "work (an operator may)"
        )


def forwards(grant: Grant) -> bool:
    """Whether a call about a task this DC has no record of goes on to the DC that has
    it: for users, yes; an agent asking is itself forwarding, and gets this DC's answer."""
    return grant.identity.kind != "agent"


def may_see(status: pb.TaskStatus, grant: Grant) -> pb.TaskStatus:
    if not grant.all_tasks and status.spec.user.id != grant.identity.name:
        raise PermissionDenied(f"{grant.identity} may act only on its own tasks")
    return status


def speaks_for(grant: Grant, dc: str, what: str) -> None:
    """An agent speaks for its own DC only."""
    identity = grant.identity
    if identity is not ANYONE and identity.dc != dc:
        raise PermissionDenied(f"{identity} may not send {what} for DC {dc!r}")
