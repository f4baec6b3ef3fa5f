"""The order queued work runs in, as the topology's queue classes and the tenants policy
set it now: one policy for this agent's queue and the DC's backlog alike.

Either source changing makes a fresh policy (``events.priority``); the run times learned
so far (``Estimates``) are shared by every policy made, so none starts from scratch.
"""

from __future__ import annotations

from mesh.agent.events import Events
from mesh.config import AgentConfig
from mesh.core import priority
from mesh.store.quota import QuotaStore


class Priorities:
    def __init__(self, cfg: AgentConfig, quota: QuotaStore, events: Events) -> None:
        self._aging_s = cfg.queue_aging_s
        self._quota = quota
        self._events = events
        self.queues = dict(cfg.queues)  # the queue classes and their weights, now
        self.estimates = priority.Estimates()
        events.queues.connect(self._queues_changed)
        events.policy.connect(events.priority.emit)

    def policy(self) -> priority.Policy:
        """A fresh policy as the queue classes and the tenants policy set it now."""
        tenants = self._quota.tenants
        if tenants is None:
            return priority.Weighted(self.queues, self._aging_s, self.estimates)
        return priority.make(
            tenants.priority.policy,
            self.queues,
            {group: spec.share for group, spec in tenants.groups.items()},
            tenants.priority.aging_s or self._aging_s,
            self.estimates,
        )

    def shares(self) -> dict[str, float]:
        """Each group's fair-share weight, as the tenants policy sets it."""
        tenants = self._quota.tenants
        return {g: spec.share for g, spec in tenants.groups.items()} if tenants else {}

    def _queues_changed(self, queues: dict[str, int]) -> None:
        self.queues = dict(queues)
        self._events.priority.emit()
