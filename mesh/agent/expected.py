"""How long tasks take on this agent, and when each queued one should start.

A task's time here is its run (its pipeline's own estimate, as the sleep pipeline makes
from its params, else the mean learned for its kind) plus, when its model is not on this
agent, the model's load (learned per model, ``Models.load_s``): a queue of tasks for a
cold model waits one load more than its run times say, and a run still loading its model
holds its GPU that much longer. The conserver weighs exactly this wait against a load on
an idle agent (``mesh.core.conserve``), so leaving the load out would keep a task here
while an idle agent could have started it sooner.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mesh.agent.runs import Running, Runs
from mesh.agent.slots import GpuSlots
from mesh.core import eta
from mesh.core.jobs import Job, traits
from mesh.core.priority import Estimates
from mesh.core.queue import LaneQueue
from mesh.pipelines import Models, Pipeline
from mesh.v1 import tasks_pb2 as pb


class Expected:
    def __init__(
        self,
        queue: LaneQueue[Job],
        slots: GpuSlots,
        runs: Runs,
        pipelines: dict[str, Pipeline],
        models: Models,
        monotonic: Callable[[], float],
    ) -> None:
        self._queue = queue
        self._slots = slots
        self._runs = runs
        self._pipelines = pipelines
        self._models = models
        self._clock = monotonic

    def run_s(self, spec: pb.TaskSpec) -> float:
        """How long a task of ``spec`` should run here, its model warm (``run_estimate``)."""
        pipeline = self._pipelines.get(spec.pipeline)
        return run_estimate(pipeline, self._queue.policy.estimates, spec)

    def waiting(self) -> list[tuple[Job, float]]:
        """The queued jobs in the order they would start here, each with the seconds until
        it is expected to (``mesh.core.eta``; ``inf`` on an agent with no slots)."""
        if not self._queue:
            return []
        order = self._queue.order(now := self._clock())
        free_in_s = [0.0] * len(self._slots.free) + self._runs.free_in_s(self._took_s, now)
        warm = set(self._models.present) | {run.job.spec.model for run in self._runs}
        queue = []
        for job in order:
            model = job.spec.model
            cold = bool(model) and model not in warm
            warm.add(model)  # the first task of a model loads it for those behind
            queue.append((job.traits.gpus, self.run_s(job.spec) + self._load_s(model, cold)))
        return list(zip(order, eta.starts(free_in_s, queue), strict=True))

    def start_s(self, task_id: str) -> float | None:
        """Seconds until the queued task ``task_id`` is expected to start here (None if
        it is not queued here, or could never start)."""
        start = next((s for job, s in self.waiting() if job.task_id == task_id), None)
        return None if start is None or math.isinf(start) else start

    def _took_s(self, run: Running) -> float:
        """How long ``run`` should hold its GPUs in all: its load if it began cold."""
        return self.run_s(run.job.spec) + self._load_s(run.job.spec.model, run.cold)

    def _load_s(self, model: str, cold: bool) -> float:
        return self._models.load_s(model) if cold else 0.0


def run_estimate(pipeline: Pipeline | None, estimates: Estimates, spec: pb.TaskSpec) -> float:
    """How long a task of ``spec`` should run: its pipeline's own estimate if it makes one
    (the sleep pipeline knows from its params), else the mean of the runs of its kind."""
    # ``Estimating`` by having the method: isinstance on a protocol scans its attributes,
    # and this runs for every queued task in every conservation round.
    estimate = getattr(pipeline, "estimate_s", None)
    own = estimate(spec) if estimate is not None else None
    return own if own is not None else estimates.expected(traits(spec).kind)
