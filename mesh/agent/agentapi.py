"""AgentService as the agent answers it: the DC's agents, routes, queue and quota as
operators and users see them, and draining this agent."""

from __future__ import annotations

import logging

from mesh.agent.api import MAX_AFFINITY, MAX_GPUS, MAX_SPLIT_USERS, owner_of
from mesh.agent.dcs import KnownDcs
from mesh.agent.dispatch import describe
from mesh.agent.membership import Membership
from mesh.agent.placement import Placement
from mesh.agent.planning import Planning
from mesh.agent.priorities import Priorities
from mesh.agent.view import View
from mesh.core.access import READER, Grant, may_administer
from mesh.core.clock import now_ms
from mesh.core.task import NAME
from mesh.errors import InvalidTask
from mesh.store.dc import DcStore
from mesh.store.quota import QuotaStore
from mesh.store.registry import AgentRecord
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


class AgentApi:
    def __init__(
        self,
        membership: Membership,
        view: View,
        planning: Planning,
        placement: Placement,
        quota: QuotaStore,
        store: DcStore,
        known: KnownDcs,
        priorities: Priorities,
    ) -> None:
        self._membership = membership
        self._registry = membership.registry
        self._view = view
        self._planning = planning
        self._placement = placement
        self._quota = quota
        self._store = store
        self._known = known
        self._priorities = priorities
        self._dc = known.dc

    async def list_agents(
        self, request: pb.ListAgentsRequest, grant: Grant
    ) -> pb.ListAgentsResponse:
        peers = sorted(self._registry.peers.values(), key=lambda a: a.agent_id)
        agents = [self._info(a) for a in peers]
        if READER not in grant.identity.held:  # where to scrape: not a submitter's business
            for info in agents:
                info.ClearField("metrics_url")
        return pb.ListAgentsResponse(agents=agents)

    def _info(self, a: AgentRecord) -> pb.AgentInfo:
        router = self._view.router
        running, queued = router.load(a.agent_id)
        gossiped = self._view.gossiper.table.get(a.agent_id)
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
            demand=self._planning.demand_of(a.agent_id),
            models_planned=sorted(self._planning.hosting_of(a.agent_id)),
            model_memory_mb=gossiped.model_mb if gossiped else 0,
        )

    async def route(self, request: pb.RouteRequest, grant: Grant) -> pb.RouteResponse:
        spec = request.spec
        if not (NAME.fullmatch(spec.model) and NAME.fullmatch(spec.pipeline)):
            raise InvalidTask("model and pipeline are required to route, as names")
        if len(spec.affinity_key) > MAX_AFFINITY or spec.gpu_count > MAX_GPUS:
            raise InvalidTask("affinity_key or gpu_count out of bounds")
        decision = self._placement.route(request.spec, explain=request.explain)
        user = owner_of(spec.user, grant.identity)
        quota = self._quota.waits(user.id, user.group, max(1, spec.gpu_count))
        return pb.RouteResponse(
            agent_id=self._membership.agent_id,
            dc=self._dc,
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
        leader, names = await self._store.leader(), await self._store.backlog.names()
        reply = describe(self._dc, leader, names, list(self._priorities.queues))
        now = now_ms()
        in_flight = self._placement.handoffs.in_flight
        for dc, summary in sorted(self._known.heard.items()):
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
        return self._info(await self._membership.drain())

    async def undrain(self, request: pb.UndrainRequest, grant: Grant) -> pb.AgentInfo:
        log.warning("taken back into service at the request of %s", grant.identity)
        return self._info(await self._membership.undrain())

    async def split_quota(self, request: pb.SplitQuotaRequest, grant: Grant) -> pb.QuotaSplit:
        may_administer(grant.identity, request.group)
        if len(request.users) + len(request.remove) > MAX_SPLIT_USERS:
            raise InvalidTask(f"a split names at most {MAX_SPLIT_USERS} users")
        tenants = await self._store.split_quota(
            request.group, dict(request.users), list(request.remove)
        )
        log.warning("group %s split by %s", request.group, grant.identity)
        spec = tenants.groups[request.group]
        users = {
            u: limits.max_gpus for u, limits in spec.users.items() if limits.max_gpus is not None
        }
        return pb.QuotaSplit(
            group=request.group, dc=self._dc, max_gpus=spec.max_gpus or 0, users=users
        )
