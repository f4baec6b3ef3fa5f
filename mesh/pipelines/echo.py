"""Returns the payload unchanged: the cheapest possible task, for tests and hop benchmarks."""

from __future__ import annotations

from mesh.config import AgentConfig
from mesh.core.jobs import Output
from mesh.pipelines import RunContext


class EchoPipeline:
    name = "echo"

    def __init__(self, cfg: AgentConfig) -> None:
        del cfg

    async def run(self, ctx: RunContext) -> Output:
        ctx.progress(1, 1, "echoed")
        media = ctx.spec.params.get("media_type", "application/octet-stream")
        return Output(ctx.spec.payload, media)
