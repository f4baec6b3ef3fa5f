"""The agent's three API facades together, as the edges (gRPC servicers, the HTTP
gateway) receive them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh.agent.agentapi import AgentApi
from mesh.agent.peerapi import PeerApi
from mesh.agent.taskapi import TaskApi


@dataclass(frozen=True)
class Apis:
    tasks: TaskApi
    agents: AgentApi
    peers: PeerApi

    def method(self, name: str) -> Callable[..., Any]:
        """The public method ``name`` (snake case) of TaskService or AgentService: what
        the HTTP gateway's routes call."""
        if not name.startswith("_"):
            for api in (self.tasks, self.agents):
                if hasattr(api, name):
                    return getattr(api, name)  # type: ignore[no-any-return]
        raise AttributeError(name)
