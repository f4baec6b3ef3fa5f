"""A run's tenant quota as its record writes carry it: the GPU slots it takes in its
start write and gives back in its end write, and the GPU-seconds it spent.

Slots are taken under the agent's lease and given back fenced by it, so slots that went
with a lost lease (and may be another run's by now) are never freed twice. A run handed
back unfinished leaves its slots to its next attempt's end write; one whose write was
refused gives them back in a write of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mesh.agent.duties import observed
from mesh.core import clock
from mesh.core.jobs import Job
from mesh.errors import QuotaBusy, Unavailable
from mesh.store.quota import QuotaStore, holder
from mesh.store.records import TaskStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slots:
    """The quota slots a run took, and the lease it took them under."""

    lease: int
    names: list[bytes] = field(default_factory=list)


NO_SLOTS = Slots(0)


class RunQuota:
    def __init__(
        self,
        agent_id: str,
        store: TaskStore,
        lease: Callable[[], int],
        quota: QuotaStore | None,
    ) -> None:
        """With no ``quota``, runs take no slots and count no GPU time."""
        self._me = agent_id
        self._store = store
        self._lease = lease
        self._quota = quota
        self._slots: dict[str, Slots] = {}  # quota slots a run holds
        self._began: dict[str, tuple[float, int]] = {}  # a recorded run's start, GPUs
        self._dropped: set[asyncio.Task[None]] = set()  # slots of dropped runs, going back

    def claim(self, job: Job, borrowed: bool) -> tuple[list, list, Slots]:
        """The compares and puts that take the run's slots in its start write
        (``QuotaBusy`` if its tenant has none free now, as the mirror sees it)."""
        lease = self._lease()
        if self._quota is None:
            return [], [], Slots(lease)
        user, gpus = job.spec.user, max(1, job.spec.gpu_count)
        if reason := self._quota.waits(user.id, user.group, gpus):
            raise QuotaBusy(reason, task_id=job.task_id)
        held_by = holder(job.task_id, self._me, borrowed)
        compares, puts, names = self._quota.claim(user.id, user.group, gpus, lease, held_by)
        return compares, puts, Slots(lease, names)

    def started(self, job: Job, slots: Slots, gpus: int) -> None:
        """The start write that took ``slots`` landed: the run holds them from now."""
        if slots.names:
            self._slots[job.task_id] = slots
        self._began[job.task_id] = (clock.now(), gpus)

    def ending(self, job: Job) -> tuple[Slots, list]:
        """The run's slots and the puts that count its GPU time, for its end write."""
        return self._slots.pop(job.task_id, NO_SLOTS), self._spent(job)

    def freeing(self, slots: Slots) -> list:
        """Operations that give ``slots`` back: none once the lease they were taken under
        is gone (they went with it, and may be another run's by now), and each fenced by
        that lease in any case (``QuotaStore.give_back``)."""
        if self._quota is None or not slots.names or slots.lease != self._lease():
            return []
        return self._quota.give_back(slots.names, slots.lease)

    async def give_back(self, slots: Slots, spent: Sequence[object] = ()) -> None:
        """Free quota slots (and count GPU time spent) outside a record write (the write
        that should have was refused, or there is none)."""
        ops = [*self.freeing(slots), *spent]
        if not ops:
            return
        try:
            await self._store.apply(ops)
        except Unavailable as exc:  # slots go with the lease; spending is counted lower
            log.warning("could not give back quota slots %s: %s", slots.names, exc)

    def stopped(self, job: Job, how: str) -> None:
        """The run is over here; one handed back unfinished (preempted, drained) leaves
        its end write, which gives the slots back, to the next attempt."""
        spent = self._spent(job)  # a run that ended unrecorded spent GPU time all the same
        slots = self._slots.pop(job.task_id, NO_SLOTS) if how.startswith("dropped") else NO_SLOTS
        if slots.names or spent:
            give_back = asyncio.create_task(self.give_back(slots, spent))
            self._dropped.add(task := observed(give_back, "quota give-back"))
            task.add_done_callback(self._dropped.discard)

    def _spent(self, job: Job) -> list:
        """Puts that add the run's GPU-seconds to its tenant's budgets (none if it never
        started here, or its tenant has no budget)."""
        began = self._began.pop(job.task_id, None)
        if began is None or self._quota is None:
            return []
        now = clock.now()
        gpu_s = (now - began[0]) * began[1]
        user = job.spec.user
        return self._quota.spend(user.id, user.group, gpu_s, self._me, now)
