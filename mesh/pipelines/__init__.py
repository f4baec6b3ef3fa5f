"""Pipelines are plugins: classes registered under the ``mesh.pipelines`` entry-point group.

A third-party package adds a pipeline by declaring, in its own pyproject::

    [project.entry-points."mesh.pipelines"]
    upscale = "mypkg.upscale:UpscalePipeline"

The agent loads each at start, builds it with the agent's config, and calls ``run`` once
per task with the GPU slot it was given. Cancellation and deadlines arrive as
``asyncio.CancelledError``; a pipeline that holds outside resources must release them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar, Protocol

from mesh.config import AgentConfig
from mesh.core.jobs import Output
from mesh.errors import ConfigError
from mesh.gpus import Gpu
from mesh.v1 import tasks_pb2

log = logging.getLogger(__name__)

GROUP = "mesh.pipelines"
# What a pipeline plugin needs, in one place: ``from mesh.pipelines import Output, ...``.
__all__ = ["GROUP", "Models", "Output", "Pipeline", "RunContext", "load_pipelines"]


class Models:
    """Which models this agent has loaded; loading one costs time once, then it is warm."""

    def __init__(self, preloaded: Iterable[str], on_loaded: Callable[[], None]) -> None:
        self.loaded: set[str] = set(preloaded)
        self.loading: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._on_loaded = on_loaded

    async def ensure(self, model: str, load: Callable[[], Awaitable[None]]) -> bool:
        """Load ``model`` unless it is loaded; True if this call paid the load."""
        if model in self.loaded:
            return False
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model in self.loaded:
                return False
            self.loading.add(model)
            try:
                await load()
            finally:
                self.loading.discard(model)
            self.loaded.add(model)
        self._on_loaded()
        return True


ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True, slots=True)
class RunContext:
    task_id: str
    attempt: int
    spec: tasks_pb2.TaskSpec
    gpus: tuple[Gpu, ...]
    models: Models
    progress: ProgressFn


class Pipeline(Protocol):
    name: ClassVar[str]

    def __init__(self, cfg: AgentConfig) -> None: ...

    async def run(self, ctx: RunContext) -> Output: ...


def load_pipelines(cfg: AgentConfig) -> dict[str, Pipeline]:
    """Instantiate the installed pipeline plugins this agent is configured to run."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    wanted = cfg.pipelines if cfg.pipelines is not None else sorted(found)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ConfigError(f"pipelines {missing} are not installed; installed: {sorted(found)}")
    return {name: found[name].load()(cfg) for name in wanted}
