"""Where a task may run, in the order to try: a pure function of the task and the peer view.

This is the walking skeleton's placement: the entry agent first if it has a free slot, then
any eligible peer with one, then a queue anywhere. Peers are tried in an order hashed from
the task id, so tasks spread across the DC without a shared counter. The routing issue
replaces it with the weighted ring and bounded loads; eligibility stays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from mesh.registry import ACTIVE, AgentRecord
from mesh.v1 import tasks_pb2 as pb


def eligible(agent: AgentRecord, spec: pb.TaskSpec) -> bool:
    """Could ``agent`` ever run ``spec``: pipeline, model, GPU count and memory, not draining."""
    if agent.state != ACTIVE or spec.pipeline not in agent.pipelines:
        return False
    if agent.models and spec.model not in agent.models:
        return False
    big_enough = sum(1 for g in agent.gpus if g.memory_mb >= spec.min_gpu_memory_mb)
    return big_enough >= max(1, spec.gpu_count)


def _spread(task_id: str, agent_id: str) -> bytes:
    return hashlib.blake2b(f"{task_id}/{agent_id}".encode(), digest_size=8).digest()


def candidates(
    spec: pb.TaskSpec, me: str, agents: Iterable[AgentRecord], visited: Sequence[str]
) -> list[str]:
    """Eligible agents not yet visited: ``me`` first, then peers with the model loaded, then
    the rest, each group in an order hashed from the task id."""
    found = [a for a in agents if a.agent_id not in visited and eligible(a, spec)]
    found.sort(
        key=lambda a: (
            a.agent_id != me,
            spec.model not in a.models_loaded,
            _spread(spec.task_id, a.agent_id),
        )
    )
    return [a.agent_id for a in found]
