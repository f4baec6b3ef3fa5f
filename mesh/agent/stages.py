"""Tasks split by layers over agents: a model no one agent's GPU memory holds runs as a
pipeline of stages (pipeline parallel), each a contiguous block of its layers on an agent
of this DC.

The agent that holds the task (it was placed here like any other) drives it: it splits
the layers over the DC's agents that run the pipeline (``mesh.core.layers.balanced``:
the split whose slowest stage is fastest, within every agent's memory), then runs the
stages in order, each with the previous one's output, on its own slot when the stage is
its own and through ``PeerService.RunStage`` otherwise. A stage takes a free GPU of its
agent at once or is refused, never queued, so no stage holds a GPU while it waits for
another (no deadlock between split tasks). When a stage's agent refuses, fails or is
gone, the layers not yet run are split again over the agents left (``layers.rest``), up
to ``MAX_RESPLITS`` times; the layers already run are not run again. The driver's own
death is any task's: the run is lost with its lease and the task is placed again.
"""

from __future__ import annotations

import logging

from mesh.agent.peers import Peers
from mesh.agent.slots import GpuSlots
from mesh.config import AgentConfig
from mesh.core import clock, layers
from mesh.core.jobs import Output
from mesh.core.router import Router
from mesh.core.task import check_stage
from mesh.errors import InvalidTask, MeshError, PipelineError
from mesh.pipelines import Layers, Models, Pipeline, RunContext, Stageable, StageRun
from mesh.store.registry import Registry
from mesh.v1 import peer_pb2

log = logging.getLogger(__name__)

MAX_STAGE_AGENTS = 16  # agents a split is drawn from: those with the most memory
MAX_RESPLITS = 3  # stage agents that may fail a run before it fails
# A stage's agent that answers with one of these is passed over for the rest of the run;
# any other error (the request itself is wrong) fails the task.
PASS_OVER = frozenset(
    {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL"}
)


class Stages:
    def __init__(
        self,
        cfg: AgentConfig,
        router: Router,
        registry: Registry,
        peers: Peers,
        slots: GpuSlots,
        models: Models,
        pipelines: dict[str, Pipeline],
    ) -> None:
        self._cfg = cfg
        self._router = router
        self._registry = registry
        self._peers = peers
        self._slots = slots
        self._models = models
        self._pipelines = pipelines

    # -- the driving end -----------------------------------------------------------------

    async def run(self, pipeline: Pipeline, ctx: RunContext) -> Output:
        """Run a task here, or split by layers when its model does not fit this agent's
        GPU memory and its pipeline can be split (the executor's runner)."""
        capacity = self._models.capacity_mb
        if not isinstance(pipeline, Stageable) or not capacity:
            return await pipeline.run(ctx)
        model = pipeline.layers(ctx.spec)
        if model.total_mb <= capacity:
            return await pipeline.run(ctx)
        return await self._drive(pipeline, ctx, model)

    async def _drive(self, pipeline: Stageable, ctx: RunContext, model: Layers) -> Output:
        total = len(model.memory_mb)
        done, data = 0, b""
        ran: list[StageRun] = []
        passed_over: set[str] = set()
        while done < total:
            devices = self._devices(ctx, passed_over)
            split = layers.rest(model.memory_mb, model.compute_s, devices, done)
            if not split.fits:
                raise PipelineError(
                    f"model {ctx.spec.model} needs {model.total_mb} MB over {total} layers; "
                    f"the agents of this DC that run {ctx.spec.pipeline} hold less"
                    + (f" without {sorted(passed_over)}" if passed_over else ""),
                    "RESOURCE_EXHAUSTED",
                )
            log.info(
                "split %s by layers: %s", ctx.task_id,
                ", ".join(f"{s.agent} {s.first}-{s.first + s.count - 1}" for s in split.stages),
            )  # fmt: skip
            for stage in split.stages:
                try:
                    data, cold = await self._stage(pipeline, ctx, stage, data)
                except _PassedOver as exc:
                    log.warning("stage %s of %s: %s", stage.agent, ctx.task_id, exc)
                    passed_over.add(stage.agent)
                    if len(passed_over) > MAX_RESPLITS:
                        raise PipelineError(
                            f"{len(passed_over)} stage agents failed: {sorted(passed_over)}",
                            "UNAVAILABLE",
                        ) from None
                    break
                ran.append(StageRun(stage.agent, stage.first, stage.count, cold))
                done = stage.first + stage.count
                ctx.progress(done, total, f"layers 0-{done - 1} of {total} run")
        return pipeline.finish(ctx, data, ran)

    def _devices(self, ctx: RunContext, passed_over: set[str]) -> list[layers.Device]:
        """The DC's agents that may run a stage of this task, as the router knows them:
        they run the pipeline, are not draining or passed over; the most memory first."""
        spec = ctx.spec
        found = [
            layers.Device(m.agent_id, sum(m.gpu_memory_mb), m.weight)
            for m in self._router.members.values()
            if spec.pipeline in m.pipelines
            and not m.draining
            and m.agent_id not in passed_over
            and (not m.models or spec.model in m.models)
        ]
        found.sort(key=lambda d: (-d.memory_mb, -d.speed, d.name))
        return found[:MAX_STAGE_AGENTS]

    async def _stage(
        self, pipeline: Stageable, ctx: RunContext, stage: layers.Stage, data: bytes
    ) -> tuple[bytes, bool]:
        if stage.agent == self._cfg.agent_id:  # our own stage runs on the task's slot
            return await pipeline.run_stage(ctx, stage.first, stage.count, data)
        record = self._registry.peers.get(stage.agent)
        if record is None or not record.peer_address:
            raise _PassedOver("gone from the registry")
        request = peer_pb2.StageRequest(
            spec=ctx.spec, attempt=ctx.attempt, first=stage.first, count=stage.count, input=data
        )
        left_s = (ctx.deadline_ms - clock.now_ms()) / 1000 if ctx.deadline_ms else 0
        if left_s <= 0:
            raise PipelineError("task deadline passed while it ran", "DEADLINE_EXCEEDED")
        try:
            reply = await self._peers.run_stage(record.peer_address, self._cfg.dc, request, left_s)
        except MeshError as exc:
            if exc.code in PASS_OVER:
                raise _PassedOver(f"{exc.code}: {exc.message}") from None
            refused = f"stage on {stage.agent} refused: {exc.message}"
            raise PipelineError(refused, exc.code) from None
        return reply.output, reply.cold

    # -- the serving end -----------------------------------------------------------------

    async def serve(
        self, request: peer_pb2.StageRequest, time_left_s: float | None
    ) -> peer_pb2.StageResponse:
        """Run one stage for an agent of this DC that drives a split task: on a free GPU
        taken at once (``GpuSlots.lend``), refused when there is none. The call must
        carry a deadline (the task's): a stage never holds a GPU past it."""
        if time_left_s is None:
            raise InvalidTask("a stage call carries its task's deadline")
        check_stage(request, self._cfg, self._pipelines.keys(), clock.now_ms())
        pipeline = self._pipelines[request.spec.pipeline]
        if not isinstance(pipeline, Stageable):
            raise InvalidTask(f"pipeline {request.spec.pipeline} cannot be split by layers")
        total = len(pipeline.layers(request.spec).memory_mb)
        if request.first + request.count > total:
            raise InvalidTask(f"layers {request.first}+{request.count} past the model's {total}")
        with self._slots.lend(request.spec.queue) as gpu:
            ctx = RunContext(
                task_id=request.spec.task_id,
                attempt=request.attempt,
                spec=request.spec,
                gpus=(gpu,),
                models=self._models,
                progress=lambda *_: None,
            )
            first, count = request.first, request.count
            output, cold = await pipeline.run_stage(ctx, first, count, request.input)
        return peer_pb2.StageResponse(output=output, cold=cold)


class _PassedOver(Exception):
    """A stage's agent could not run it now: the rest goes to other agents."""
