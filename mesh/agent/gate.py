"""Tenant quota at the door of the GPU slots: which task may start, and the ones that wait.

The executor asks ``verdict`` before it starts a task; a task whose tenant is at its cap
or out of budget is ``hold``-ed aside here, never blocking the queue, until the quota
changes (a slot given back, the policy changed, a budget renewed) and ``release`` hands
the held tasks back, in order, to be judged again. A spent budget renews with no change
in etcd, so the gate keeps a timer for it and announces the renewal as a quota change.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from mesh import metrics
from mesh.agent.decisionlog import DecisionLog
from mesh.agent.events import Signal
from mesh.core import clock
from mesh.core.jobs import Job
from mesh.core.tenants import blocked, renewal_in_s
from mesh.store.quota import QuotaStore


class QuotaGate:
    def __init__(
        self,
        quota: QuotaStore | None = None,
        decisions: DecisionLog | None = None,
        changed: Signal[[]] | None = None,
    ) -> None:
        """``changed`` is emitted when a budget renews; with no ``quota``, every task
        may start."""
        self._quota = quota
        self._decisions = decisions
        self._changed = changed if changed is not None else Signal("quota")
        self._held: dict[str, Job] = {}  # in the order they were held
        self._groups: set[str] = set()  # groups the waiting gauge shows
        self._renewal: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._held

    def get(self, task_id: str) -> Job | None:
        return self._held.get(task_id)

    def verdict(self, job: Job) -> str | None:
        """Why ``job`` must wait for its tenant's quota (None: it may start); a capped
        task's verdict goes to the decision log."""
        if self._quota is None:
            return None
        user, gpus = job.spec.user, max(1, job.spec.gpu_count)
        judged = self._quota.judge(user.id, user.group, gpus, clock.now())
        if (judged.caps or judged.budgets) and self._decisions is not None:
            self._decisions.quota(job.task_id, gpus, judged)
        if judged.reason and not blocked(judged.caps, judged.held, gpus):
            self._judge_again_in(renewal_in_s(judged.budgets, judged.now_s))
        return judged.reason

    def hold(self, job: Job) -> bool:
        """Set ``job`` aside until the quota changes; whether it was not held already."""
        new = job.task_id not in self._held
        self._held[job.task_id] = job
        self._count()
        return new

    def release(self) -> list[Job]:
        """Every held job, in the order held, for the queue to judge again."""
        released = list(self._held.values())
        self._held.clear()
        self._count()
        return released

    def withdraw(self, task_id: str) -> Job | None:
        job = self._held.pop(task_id, None)
        if job is not None:
            self._count()
        return job

    def _count(self) -> None:
        counts = Counter(j.spec.user.group or metrics.NO_GROUP for j in self._held.values())
        for group in self._groups - counts.keys():
            metrics.QUOTA_WAITING.labels(group).set(0)
        for group, n in counts.items():
            metrics.QUOTA_WAITING.labels(group).set(n)
        self._groups = set(counts)

    def _judge_again_in(self, delay_s: float) -> None:
        """Judge the held tasks again when a spent budget is renewed: nothing in etcd
        changes then, so nothing else would wake them."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay_s
        if self._renewal is not None and self._renewal.when() <= at:
            return
        if self._renewal is not None:
            self._renewal.cancel()
        self._renewal = loop.call_at(at, self._renewed)

    def _renewed(self) -> None:
        self._renewal = None
        self._changed.emit()
