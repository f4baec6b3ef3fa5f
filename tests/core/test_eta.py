"""Expected starts (``mesh.core.eta``): list scheduling of the tasks ahead, in order, on
the slots as they free. Pure: exact cases, then properties."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from mesh.core.eta import expected_start, starts


def test_an_idle_slot_starts_a_task_now() -> None:
    assert expected_start([0.0, 5.0], [], gpus=1) == 0.0


def test_one_slot_runs_the_tasks_ahead_one_after_the_other() -> None:
    assert expected_start([2.0], [(1, 3.0), (1, 4.0)], gpus=1) == 9.0


def test_two_slots_share_the_tasks_ahead() -> None:
    # Slots free at 1 and 2; ahead: 4 s on the first (1-5), 1 s on the second (2-3).
    assert expected_start([1.0, 2.0], [(1, 4.0), (1, 1.0)], gpus=1) == 3.0


def test_a_wide_task_waits_for_all_its_slots_and_nothing_overtakes_a_blocked_head() -> None:
    # The 2-GPU task ahead starts at 6 (both free), so ours starts no earlier than that.
    assert expected_start([0.0, 6.0], [(2, 1.0)], gpus=1) == 7.0
    assert expected_start([0.0, 6.0], [], gpus=2) == 6.0


def test_no_slots_no_start() -> None:
    assert expected_start([], [], gpus=1) == math.inf


slots = st.lists(st.floats(0, 100), min_size=1, max_size=8)
tasks = st.lists(st.tuples(st.integers(1, 4), st.floats(0, 50)), max_size=12)


@given(slots, tasks, st.integers(1, 4))
def test_never_before_now_nor_before_a_slot_could_free(
    free: list[float], ahead: list[tuple[int, float]], gpus: int
) -> None:
    start = expected_start(free, ahead, gpus)
    assert start >= sorted(free)[min(gpus, len(free)) - 1]


@given(slots, tasks, st.tuples(st.integers(1, 4), st.floats(0, 50)), st.integers(1, 4))
def test_one_more_task_ahead_never_makes_it_earlier(
    free: list[float], ahead: list[tuple[int, float]], extra: tuple[int, float], gpus: int
) -> None:
    assert expected_start(free, [*ahead, extra], gpus) >= expected_start(free, ahead, gpus)


@given(st.floats(0, 100), st.lists(st.floats(0, 50), max_size=12))
def test_on_one_slot_it_is_the_sum_of_the_work_ahead(free: float, ahead: list[float]) -> None:
    start = expected_start([free], [(1, s) for s in ahead], gpus=1)
    assert math.isclose(start, free + sum(ahead), rel_tol=1e-9, abs_tol=1e-9)


@given(slots, tasks)
def test_every_start_of_a_queue_is_the_start_of_its_last_task_alone(
    free: list[float], queue: list[tuple[int, float]]
) -> None:
    found = starts(free, queue)
    assert found == [expected_start(free, queue[:i], gpus) for i, (gpus, _) in enumerate(queue)]
    assert found == sorted(found)  # nothing overtakes the task ahead of it
