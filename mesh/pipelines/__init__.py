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
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import ClassVar, Protocol, runtime_checkable

from mesh.config import AgentConfig
from mesh.core import clock
from mesh.core.jobs import Output
from mesh.core.residency import Demand, Resident, evictions
from mesh.errors import ConfigError, PipelineError
from mesh.gpus import Gpu
from mesh.v1 import tasks_pb2

log = logging.getLogger(__name__)

GROUP = "mesh.pipelines"
# What a pipeline plugin needs, in one place: ``from mesh.pipelines import Output, ...``.
__all__ = [
    "GROUP",
    "Estimating",
    "Layers",
    "Models",
    "ModelsFull",
    "Output",
    "Pipeline",
    "RunContext",
    "StageRun",
    "Stageable",
    "load_pipelines",
]  # fmt: skip


DEFAULT_LOAD_S = 1.0  # a model load's cost before any load was seen here


class Models:
    """Which models this agent has loaded, in how much GPU memory; loading one costs time
    once, then it is warm. A pipeline runs a task inside ``using``, declaring the model's
    memory: a load that would not fit evicts the least useful models first
    (``mesh.core.residency``), and waits for a run to end when only models in use are left.
    Eviction here is bookkeeping: a pipeline that holds real weights frees them when
    ``on_evicted`` names the model."""

    def __init__(
        self,
        preloaded: Iterable[str],
        on_loaded: Callable[[], None],
        capacity_mb: int = 0,
        clock: Callable[[], float] = clock.monotonic,
        on_evicted: Callable[[str], None] = lambda _: None,
        on_loading: Callable[[], None] = lambda: None,
    ) -> None:
        """``capacity_mb``: the GPU memory models may fill (0: no limit); ``on_loading``
        is called when a load begins (routers treat a model on its way as there)."""
        self.loaded: set[str] = set(preloaded)
        self.loading: set[str] = set()
        self.memory_mb: dict[str, int] = dict.fromkeys(self.loaded, 0)
        self.capacity_mb = capacity_mb
        self.demand = Demand()
        self.planned: frozenset[str] = frozenset()  # what the placement plan gives us
        self._clock = clock
        self._last_used: dict[str, float] = {}
        self._in_use: Counter[str] = Counter()
        self._load_s: dict[str, float] = {}  # how long each model's last load took
        self._locks: dict[str, asyncio.Lock] = {}
        self._room = asyncio.Condition()
        self._on_loaded = on_loaded
        self._on_evicted = on_evicted
        self._on_loading = on_loading

    @property
    def present(self) -> frozenset[str]:
        """Models loaded or on their way: a task sent here waits at most for the rest of
        a load under way, never a whole one."""
        return frozenset(self.loaded | self.loading)

    def load_s(self, model: str) -> float:
        """How long a load of ``model`` is expected to take: the last one seen here, else
        the longest seen of any model (an unknown model is no cheaper than known ones)."""
        if model in self._load_s:
            return self._load_s[model]
        return max(self._load_s.values(), default=DEFAULT_LOAD_S)

    @property
    def used_mb(self) -> int:
        return sum(self.memory_mb.values())

    @contextlib.asynccontextmanager
    async def using(
        self, model: str, load: Callable[[], Awaitable[None]], memory_mb: int = 0
    ) -> AsyncIterator[bool]:
        """Hold ``model`` loaded for a run (loading it first if need be); yields whether
        this run paid the load. While held, it is never evicted."""
        self._in_use[model] += 1
        try:
            yield await self.ensure(model, load, memory_mb)
        finally:
            self._in_use[model] -= 1
            if not self._in_use[model]:
                del self._in_use[model]
            self._last_used[model] = self._clock()
            async with self._room:
                self._room.notify_all()

    async def ensure(
        self,
        model: str,
        load: Callable[[], Awaitable[None]],
        memory_mb: int = 0,
        evict_planned: bool = True,
    ) -> bool:
        """Load ``model`` unless it is loaded; True if this call paid the load. A warm-up
        (``evict_planned`` False) evicts only models the plan does not give us, and gives
        up (``ModelsFull``) rather than wait."""
        if model in self.loaded:
            return False
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model in self.loaded:
                return False
            await self._make_room(model, max(0, memory_mb), evict_planned)
            self.loading.add(model)
            self._on_loading()
            began = self._clock()
            try:
                await load()
                self._load_s[model] = self._clock() - began
            except BaseException:
                self.memory_mb.pop(model, None)
                raise
            finally:
                self.loading.discard(model)
            self.loaded.add(model)
        self._on_loaded()
        return True

    async def _make_room(self, model: str, need_mb: int, evict_planned: bool) -> None:
        """Reserve ``need_mb`` for ``model``, evicting what ``evictions`` says; wait for a
        run to end while only models in use stand in the way."""
        if self.capacity_mb and need_mb > self.capacity_mb:
            raise ModelsFull(
                f"model {model} needs {need_mb} MB; this agent's GPUs hold {self.capacity_mb}"
            )
        async with self._room:
            while True:
                now = self._clock()
                residents = {
                    name: Resident(
                        mb,
                        self._last_used.get(name, 0.0),
                        self.demand.rate(name, now),
                        name in self.planned,
                        # in use: a run holds it, it is loading, or a warm-up spares it
                        self._in_use[name]
                        + (name in self.loading)
                        + (not evict_planned and name in self.planned),
                    )
                    for name, mb in self.memory_mb.items()
                }
                chosen = evictions(residents, need_mb, self.capacity_mb) if self.capacity_mb else []
                if chosen is not None:
                    break
                if not evict_planned:
                    raise ModelsFull(f"no room to warm {model} without evicting planned models")
                await self._room.wait()
            for name in chosen:
                log.info("evicting model %s for %s", name, model)
                self.loaded.discard(name)
                del self.memory_mb[name]
                self._on_evicted(name)
            self.memory_mb[model] = need_mb


class ModelsFull(PipelineError):
    """A model does not fit this agent's GPU memory (now, or ever)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "RESOURCE_EXHAUSTED")


ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True, slots=True)
class RunContext:
    task_id: str
    attempt: int
    spec: tasks_pb2.TaskSpec
    gpus: tuple[Gpu, ...]
    models: Models
    progress: ProgressFn
    deadline_ms: int = 0  # when the task must be done, Unix ms (0: none known)


class Pipeline(Protocol):
    name: ClassVar[str]

    def __init__(self, cfg: AgentConfig) -> None: ...

    async def run(self, ctx: RunContext) -> Output: ...


@dataclass(frozen=True, slots=True)
class Layers:
    """A model's layers, in order: each one's GPU memory and compute (seconds on a GPU of
    weight 1, an H100)."""

    memory_mb: tuple[int, ...]
    compute_s: tuple[float, ...]

    @property
    def total_mb(self) -> int:
        return sum(self.memory_mb)


@dataclass(frozen=True, slots=True)
class StageRun:
    """A stage as it ran: where, which layers, whether it paid their load."""

    agent: str
    first: int
    count: int
    cold: bool


class Estimating(Protocol):
    """A pipeline that knows how long a task will run from its spec (the sleep pipeline,
    from its params): a queue's expected starts use it before any run of the kind has
    been seen, when the learned mean would still be a guess."""

    def estimate_s(self, spec: tasks_pb2.TaskSpec) -> float | None:
        """Seconds the task is expected to run, its model warm; None: no estimate."""
        ...


@runtime_checkable
class Stageable(Protocol):
    """A pipeline that can run a model split by layers over several agents (pipeline
    parallel), for a model no one agent's GPU memory holds: the agent that holds the task
    runs the stages in order, each on its own agent, each stage's output the next one's
    input (``mesh.agent.stages``)."""

    def layers(self, spec: tasks_pb2.TaskSpec) -> Layers:
        """The task's model's layers; raises ``PipelineError`` for bad params."""
        ...

    async def run_stage(
        self, ctx: RunContext, first: int, count: int, data: bytes
    ) -> tuple[bytes, bool]:
        """Run layers ``first`` to ``first + count - 1`` on ``data`` (the previous stage's
        output; empty for the first): the output, and whether the stage paid a load."""
        ...

    def finish(self, ctx: RunContext, data: bytes, stages: list[StageRun]) -> Output:
        """The task's result from the last stage's output and what each stage did."""
        ...


@functools.cache
def _installed() -> dict[str, EntryPoint]:
    """The pipeline plugins installed, read once a process: the scan reads every
    distribution's metadata (a simulation boots hundreds of agents)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_pipelines(cfg: AgentConfig) -> dict[str, Pipeline]:
    """Instantiate the installed pipeline plugins this agent is configured to run."""
    found = _installed()
    wanted = cfg.pipelines if cfg.pipelines is not None else sorted(found)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ConfigError(f"pipelines {missing} are not installed; installed: {sorted(found)}")
    return {name: found[name].load()(cfg) for name in wanted}
