"""The changes an agent's parts tell each other of, through one small hub.

A part that changes something others must follow emits a signal; the parts that follow
it connect when the composition root builds them (``mesh.agent.compose``). So no part
holds a callback into a part built after it, and what listens to what is written in one
place. Listeners run at once, in the order they connected, on the emitter's stack: they
only note the change (set an event, mark a flag, copy a value) and never await.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, ParamSpec

from mesh.core.jobs import Job

P = ParamSpec("P")


class Signal(Generic[P]):
    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[P, None]] = []

    def connect(self, listener: Callable[P, None]) -> None:
        self._listeners.append(listener)

    def emit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for listener in self._listeners:
            listener(*args, **kwargs)


def _signal(name: str) -> Callable[[], Signal]:  # type: ignore[type-arg]
    return lambda: Signal(name)


@dataclass(frozen=True)
class Events:
    """``members``: agents joined, changed (their record) or left (None);
    ``capacity``: load or membership in the router's view changed (the owner looks
    again); ``local``: this agent's own load or models changed (the view and gossip
    follow); ``quota``: a quota slot came back, the policy changed or a budget renewed
    (the tasks waiting for quota are judged again); ``policy``: the tenants policy
    changed; ``queues``: the topology brought new queue classes; ``priority``: the
    priority policy that follows from both; ``weights``: the topology set new GPU
    weights; ``republish``: this agent's record changed (its loaded models) and is
    published again; ``preempted``: a batch run gave its GPUs to online work and has
    stopped (its task is handed back)."""

    members: Signal[[dict]] = field(default_factory=_signal("members"))
    capacity: Signal[[]] = field(default_factory=_signal("capacity"))
    local: Signal[[]] = field(default_factory=_signal("local"))
    quota: Signal[[]] = field(default_factory=_signal("quota"))
    policy: Signal[[]] = field(default_factory=_signal("policy"))
    queues: Signal[[dict]] = field(default_factory=_signal("queues"))
    priority: Signal[[]] = field(default_factory=_signal("priority"))
    weights: Signal[[dict]] = field(default_factory=_signal("weights"))
    republish: Signal[[]] = field(default_factory=_signal("republish"))
    preempted: Signal[[Job]] = field(default_factory=_signal("preempted"))
