"""Preemption, decided: which batch runs give their slots back to waiting online work.

Batch may borrow online's idle slots (``mesh.core.classes``); when an online task waits
for a slot batch has borrowed, the borrowed runs are preempted (given back, to run again
as a new attempt). A batch task that asks never to be preempted may not borrow: it
starts only within batch's own share. Victims come in Kueue's order: the tenants
furthest over their share first (GPUs held here over the tenant's fair-share weight),
then the lowest priority (queue class weight), then the most recently started. Pure: the
executor applies what these say, and the decision log replays them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh.core.classes import BATCH, ONLINE, batch_slots


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
