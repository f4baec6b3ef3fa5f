"""Simulated GPU work: a model load when the model is cold, then timed steps.

It gives affinity a real price in demos and benchmarks: a task routed where its model is
already loaded skips the load delay (``model_load_s``). It can also be split by layers
over agents (``Stageable``): the model's memory and the task's ``seconds`` are shared
evenly by ``layers`` layers (param, default 8), and each stage loads its own block of
them (as model ``<model>:layers<first>-<last>``) and sleeps for its share.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

from mesh.config import AgentConfig
from mesh.core.jobs import Output
from mesh.errors import PipelineError
from mesh.pipelines import Layers, RunContext, StageRun
from mesh.v1 import tasks_pb2

MAX_STEPS = 10_000
MAX_LAYERS = 1024
DEFAULT_LAYERS = 8


def _number(params: dict[str, str], key: str, default: float) -> float:
    try:
        value = float(params.get(key, default))
    except ValueError:
        raise PipelineError(f"param {key!r} must be a number", "INVALID_ARGUMENT") from None
    if not 0 <= value < float("inf"):
        raise PipelineError(f"param {key!r} must be >= 0", "INVALID_ARGUMENT")
    return value


class SleepPipeline:
    name = "sleep"

    def __init__(self, cfg: AgentConfig) -> None:
        self._load_s = cfg.model_load_s
        self._memory = cfg.model_memory_mb
        self._default_mb = cfg.default_model_memory_mb

    def load(self, model: str) -> Awaitable[None]:
        """Load ``model``'s weights (simulated: the configured delay)."""
        del model
        return asyncio.sleep(self._load_s)

    def memory_mb(self, model: str) -> int:
        """The GPU memory ``model`` takes once loaded, as the agent's config declares."""
        return self._memory.get(model, self._default_mb)

    async def run(self, ctx: RunContext) -> Output:
        params = dict(ctx.spec.params)
        seconds = _number(params, "seconds", 1.0)
        steps = int(min(_number(params, "steps", 10), MAX_STEPS)) or 1
        model = ctx.spec.model
        async with ctx.models.using(model, lambda: self.load(model), self.memory_mb(model)) as cold:
            for step in range(1, steps + 1):
                await asyncio.sleep(seconds / steps)
                ctx.progress(step, steps, f"step {step}/{steps}")
        summary = {"model": ctx.spec.model, "seconds": seconds, "cold_start": cold}
        return Output(json.dumps(summary).encode(), "application/json")

    def estimate_s(self, spec: tasks_pb2.TaskSpec) -> float | None:
        try:
            return _number(dict(spec.params), "seconds", 1.0)
        except PipelineError:
            return None

    def layers(self, spec: tasks_pb2.TaskSpec) -> Layers:
        params = dict(spec.params)
        count = int(_number(params, "layers", DEFAULT_LAYERS))
        if not 1 <= count <= MAX_LAYERS:
            raise PipelineError(f"param 'layers' must be 1 to {MAX_LAYERS}", "INVALID_ARGUMENT")
        share, extra = divmod(self.memory_mb(spec.model), count)
        seconds = _number(params, "seconds", 1.0) / count
        return Layers(tuple(share + (i < extra) for i in range(count)), (seconds,) * count)

    async def run_stage(
        self, ctx: RunContext, first: int, count: int, data: bytes
    ) -> tuple[bytes, bool]:
        layers = self.layers(ctx.spec)
        if (run := _layers_run(data)) != first:
            raise PipelineError(
                f"stage of layers {first}+ got the output of {run} layers", "INVALID_ARGUMENT"
            )
        part = f"{ctx.spec.model[:96]}:layers{first}-{first + count - 1}"  # a name, <= 128
        memory = sum(layers.memory_mb[first : first + count])
        async with ctx.models.using(part, lambda: self.load(part), memory) as cold:
            await asyncio.sleep(sum(layers.compute_s[first : first + count]))
        return json.dumps({"layers_run": first + count}).encode(), cold

    def finish(self, ctx: RunContext, data: bytes, stages: list[StageRun]) -> Output:
        summary = {
            "model": ctx.spec.model,
            "seconds": _number(dict(ctx.spec.params), "seconds", 1.0),
            "cold_start": any(stage.cold for stage in stages),
            "layers_run": _layers_run(data),
            "stages": [
                {"agent": s.agent, "first": s.first, "count": s.count, "cold": s.cold}
                for s in stages
            ],
        }
        return Output(json.dumps(summary).encode(), "application/json")


def _layers_run(data: bytes) -> int:
    """How many layers produced ``data`` (a stage's output; empty: none yet)."""
    if not data:
        return 0
    try:
        found = json.loads(data)["layers_run"]
    except (ValueError, TypeError, KeyError):
        found = None
    if not isinstance(found, int) or isinstance(found, bool):
        raise PipelineError("stage input is not a stage's output", "INVALID_ARGUMENT")
    return found
