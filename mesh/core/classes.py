"""Online and batch: online work is guaranteed most of the GPUs, batch borrows the rest.

Each agent keeps the DC's split on its own slots: ``online_share`` of them (rounded up)
are online's whenever online work waits, the rest batch's. Either class may use the
other's idle slots; when an online task waits for a slot that batch has borrowed, the
borrowed batch runs are preempted (given back, to run again as a new attempt). Every
agent keeping the split on its slots keeps it on the DC's. A batch task that asks never
to be preempted may not borrow: it starts only within batch's own share.

Victims come in Kueue's order: the tenants furthest over their share first (GPUs held
here over the tenant's fair-share weight), then the lowest priority (queue class weight),
then the most recently started. Pure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Run:
    """A run as preemption sees it."""

    task_id: str
    task_class: str
    tenant: str
    gpus: int
    started_at: float
    weight: int = 1  # its queue class's weight: the lower, the sooner preempted
    preemptible: bool = True


def borrows(
    running: Sequence[Run], task_class: str, gpus: int, slots: int, online_share: float
) -> bool:
    """Whether a run of ``task_class`` on ``gpus`` more slots goes past its class's own
    share of the ``slots``, into the other class's idle ones."""
    own = batch_slots(slots, online_share)
    if task_class == ONLINE:
        own = slots - own
    held = sum(r.gpus for r in running if r.task_class == task_class)
    return held + gpus > own


def batch_may_start(running: Sequence[Run], gpus: int, slots: int, online_share: float) -> bool:
    """Whether a batch task that must not be preempted may start: only within batch's
    own share, since it could never give a borrowed slot back."""
    return not borrows(running, BATCH, gpus, slots, online_share)


def victims(
    running: Sequence[Run],
    free: int,
    need: int,
    slots: int,
    online_share: float,
    shares: Mapping[str, float] | None = None,
) -> list[str]:
    """The batch runs to preempt so that an online task needing ``need`` GPUs can start
    (``free`` are idle now): none if it fits, or if preempting every borrowed run would
    still not make room. Never takes batch below its own share. The tenant furthest over
    its ``shares`` weight (GPUs held here over its weight, 1 if unnamed) gives first."""
    if need <= free:
        return []
    batch = [r for r in running if r.task_class == BATCH]
    borrowed = sum(r.gpus for r in batch) - batch_slots(slots, online_share)
    held: Counter[str] = Counter()
    for r in batch:
        held[r.tenant] += r.gpus

    def weigh(tenant: str) -> float:
        return (shares or {}).get(tenant, 1.0)

    order = sorted(
        (r for r in batch if r.preemptible),
        key=lambda r: (-held[r.tenant] / weigh(r.tenant), r.weight, -r.started_at, r.task_id),
    )
    chosen, freed = [], 0
    for run in order:
        if free + freed >= need:
            break
        if freed + run.gpus > borrowed:
            continue
        chosen.append(run.task_id)
        freed += run.gpus
    return chosen if free + freed >= need else []
