"""Online work taking back the slots batch borrowed: whether it can here, when, and from
whom (``mesh.core.preemption`` decides whom; this applies it).

An online task that finds no slot waits ``preempt_after_s`` first: a slot may free
elsewhere, and a preempted run is work lost. Then the chosen batch runs are stopped and
handed back, to run again as a new attempt.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mesh.agent.runs import Runs
from mesh.core import classes, preemption
from mesh.core.jobs import Job
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sharing:
    """How online and batch work share the slots: ``online_share`` the part online is
    guaranteed, ``shares`` the tenants' fair-share weights (who gives way first);
    ``decided`` hears each preemption decision with its inputs (the decision log),
    ``preempted`` gets a preempted batch job once its run has stopped."""

    online_share: Callable[[], float] = lambda: classes.DEFAULT_ONLINE_SHARE
    shares: Callable[[], Mapping[str, float]] = dict
    decided: Callable[..., None] = lambda *_: None
    preempted: Callable[[Job], None] = lambda _: None


class Reclaimer:
    def __init__(
        self,
        preempt_after_s: float,
        runs: Runs,
        sharing: Sharing,
        since: Callable[[Job], float | None],
        wake: Callable[[], None],
    ) -> None:
        """``since`` says when a queued job was queued; ``wake`` looks at the queue
        again."""
        self._after_s = preempt_after_s
        self._slots = runs.slots
        self._runs = runs
        self._sharing = sharing
        self._since = since
        self._wake = wake
        self._clock = runs.clock
        self._recheck: asyncio.TimerHandle | None = None

    def could(self, spec: pb.TaskSpec, online_ahead: int) -> bool:
        """Whether an online task needing ``spec``'s GPUs would get them here by
        preemption, past ``online_ahead`` GPUs of online work already queued."""
        need = online_ahead + max(1, spec.gpu_count)
        share, shares = self._sharing.online_share(), self._sharing.shares()
        runs = self._runs.as_preemption_sees()
        return bool(preemption.victims(runs, 0, need, len(self._slots), share, shares))

    def in_time(self, job: Job) -> None:
        """Reclaim for ``job`` once it has waited ``preempt_after_s``; until then, look
        again then."""
        since = self._since(job)
        waited = 0.0 if since is None else self._clock() - since
        left = self._after_s - waited
        if left <= 0:
            self._reclaim(job)
        elif self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(left, self._look_again)

    def _look_again(self) -> None:
        self._recheck = None
        self._wake()

    def _reclaim(self, job: Job) -> None:
        """Preempt the batch runs that borrowed the slots online ``job`` waits for."""
        sharing = self._sharing
        need, slots = max(1, job.spec.gpu_count), len(self._slots)
        freeing = sum(len(r.gpus) for r in self._runs if r.preempted)
        free = len(self._slots.fitting(job.spec)) + freeing
        runs, share = self._runs.as_preemption_sees(), sharing.online_share()
        shares = sharing.shares()
        chosen = preemption.victims(runs, free, need, slots, share, shares)
        if chosen:
            sharing.decided(job.task_id, runs, free, need, slots, share, shares, chosen)
        for task_id in chosen:
            run = self._runs.get(task_id)
            assert run is not None
            log.info("preempting batch task %s for online task %s", task_id, job.task_id)
            run.preempted = True
            run.stop(f"preempted by online task {job.task_id}", handed_back=True)
