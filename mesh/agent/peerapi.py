"""PeerService as the agent answers it: what other agents ask of it (offers, summaries,
settles, claims, stages, local cancels, stored results), each only from an agent that
speaks for the DC it names."""

from __future__ import annotations

from collections.abc import AsyncIterator

from mesh.agent.addressing import Addressing
from mesh.agent.api import MAX_REASON, MAX_TOKEN, ToTheEnd, speaks_for
from mesh.agent.cancels import Cancels
from mesh.agent.intake import Intake
from mesh.agent.speaker import Speaker
from mesh.agent.stages import Stages
from mesh.agent.tasks import Tasks
from mesh.agent.view import View
from mesh.core.access import Grant
from mesh.core.task import check_id
from mesh.errors import InvalidTask
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb


class PeerApi:
    def __init__(
        self,
        dc: str,
        intake: Intake,
        view: View,
        speaker: Speaker,
        addressing: Addressing,
        stages: Stages,
        tasks: Tasks,
        cancels: Cancels,
        to_the_end: ToTheEnd,
    ) -> None:
        self._dc = dc
        self._intake = intake
        self._view = view
        self._speaker = speaker
        self._addressing = addressing
        self._stages = stages
        self._tasks = tasks
        self._cancels = cancels
        self._to_the_end = to_the_end

    async def offer(self, request: peer_pb2.Envelope, grant: Grant) -> peer_pb2.OfferResponse:
        speaks_for(grant, request.origin_dc or self._dc, what="an offer")
        accepted, reason = await self._to_the_end(self._intake.offer(request))
        return peer_pb2.OfferResponse(accepted=accepted, reason=reason, load=self._view.load())

    async def summary(self, request: peer_pb2.DcSummary, grant: Grant) -> peer_pb2.DcSummary:
        speaks_for(grant, request.dc, what="a summary")
        return await self._speaker.received(request)

    async def settle(
        self, request: peer_pb2.SettleRequest, grant: Grant
    ) -> peer_pb2.SettleResponse:
        speaks_for(grant, request.origin_dc, what="a settle")
        return await self._to_the_end(self._intake.settle(request))

    async def claim(self, request: peer_pb2.ClaimRequest, grant: Grant) -> peer_pb2.ClaimResponse:
        speaks_for(grant, request.dc, what="a claim")
        check_id(request.task_id)
        if len(request.spec_digest) > MAX_TOKEN or len(request.stale_holder) > MAX_TOKEN:
            raise InvalidTask("spec_digest or stale_holder out of bounds")
        return await self._to_the_end(self._addressing.answer(request))

    async def run_stage(
        self, request: peer_pb2.StageRequest, grant: Grant, time_left_s: float | None
    ) -> peer_pb2.StageResponse:
        speaks_for(grant, self._dc, what="a stage")  # a split stays in its DC
        return await self._stages.serve(request, time_left_s)

    async def cancel_local(self, request: pb.CancelRequest, grant: Grant) -> pb.TaskStatus:
        speaks_for(grant, self._dc, what="a local cancel")
        check_id(request.task_id)
        return await self._cancels.cancel_local(request.task_id, request.reason[:MAX_REASON])

    async def fetch_result(
        self, request: pb.GetResultRequest, grant: Grant
    ) -> AsyncIterator[pb.ResultChunk]:
        speaks_for(grant, self._dc, what="a result fetch")
        check_id(request.task_id)
        async for chunk in self._tasks.stored_result(request.task_id):
            yield chunk
