"""When a queued task is expected to start: the answer ``Get`` gives a waiting user. Pure.

The agent knows when its GPU slots free (each run's expected end, from run times learned
per pipeline and model) and the order its queue would run the tasks ahead (the policy's
own order, ``LaneQueue.order``). Starting those in that order on the slots that free
first, as the executor does (a head that does not fit waits, and nothing overtakes it),
gives the task's start. It is an estimate: arrivals of higher priority, preemption and
run times off their mean move it, and each of those is the user's to see in the record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def starts(free_in_s: Sequence[float], queue: Sequence[tuple[int, float]]) -> list[float]:
    """Seconds from now until each task of ``queue`` ((GPUs, expected seconds) each, in
    the order they start) starts, on slots that free in ``free_in_s`` (0: idle now); all
    ``inf`` on an agent with no slots. One pass: a queue's every estimate costs what its
    last one does."""
    free = sorted(max(0.0, s) for s in free_in_s)
    if not free:
        return [math.inf] * len(queue)
    found = []
    begun = 0.0  # no task starts before the one ahead of it
    for need, seconds in queue:
        n = min(max(1, need), len(free))  # a task wider than the agent takes it all
        begun = max(begun, free[n - 1])  # when its n earliest slots are all free
        found.append(begun)
        free = sorted(free[n:] + [begun + max(0.0, seconds)] * n)
    return found


def expected_start(
    free_in_s: Sequence[float], ahead: Sequence[tuple[int, float]], gpus: int
) -> float:
    """Seconds from now until a task needing ``gpus`` starts, on slots that free in
    ``free_in_s`` (0: idle now), after the tasks ``ahead`` ((GPUs, expected seconds) each,
    in the order they start); ``inf`` on an agent with no slots."""
    return starts(free_in_s, [*ahead, (gpus, 0.0)])[-1]
