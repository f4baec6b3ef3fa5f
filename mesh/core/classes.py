"""Online and batch: online work is guaranteed most of the GPUs, batch borrows the rest.

Each agent keeps the DC's split on its own slots: ``online_share`` of them (rounded up)
are online's whenever online work waits, the rest batch's. Either class may use the
other's idle slots; when an online task waits for a slot that batch has borrowed, the
borrowed batch runs are preempted (``mesh.core.preemption``). Every agent keeping the
split on its slots keeps it on the DC's. Pure.
"""

from __future__ import annotations

import math

from mesh.v1 import tasks_pb2 as pb

ONLINE, BATCH = "online", "batch"
ONLINE_TYPES = (pb.TASK_TYPE_LLM, pb.TASK_TYPE_TTS)
DEFAULT_ONLINE_SHARE = 0.7


def task_class(spec: pb.TaskSpec) -> str:
    """``online`` or ``batch``: as the spec says, else from its task type."""
    if spec.task_class == pb.TASK_CLASS_ONLINE:
        return ONLINE
    if spec.task_class == pb.TASK_CLASS_BATCH:
        return BATCH
    return ONLINE if spec.task_type in ONLINE_TYPES else BATCH


def batch_slots(slots: int, online_share: float) -> int:
    """The slots batch may hold while online work waits: what online's share leaves."""
    return slots - math.ceil(slots * online_share - 1e-9)
