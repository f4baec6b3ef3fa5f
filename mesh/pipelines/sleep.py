"""Simulated GPU work: a model load when the model is cold, then timed steps.

It gives affinity a real price in demos and benchmarks: a task routed where its model is
already loaded skips the load delay (``model_load_s``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

from mesh.config import AgentConfig
from mesh.core.jobs import Output
from mesh.errors import PipelineError
from mesh.pipelines import RunContext

MAX_STEPS = 10_000


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
