"""The idle-while-queued measure of ``bench placement``: what its figures mean, on spans
made by hand ((submitted, started, finished) seconds, on a DC of two slots)."""

from __future__ import annotations

import pytest

from bench.placement import idle_while_queued


def test_every_idle_slot_second_counts_without_a_grace() -> None:
    spans = [(0.0, 0.0, 5.0), (0.0, 5.3, 10.0)]  # the second waits while a slot is idle
    assert idle_while_queued(spans, 2, 0.0) == pytest.approx(5.3, abs=0.01)


def test_past_the_grace_counts_what_outlasts_it_for_slot_and_task_both() -> None:
    spans = [(0.0, 0.0, 5.0), (0.0, 5.3, 10.0)]
    assert idle_while_queued(spans, 2, 2.0) == pytest.approx(3.3, abs=0.01)


def test_a_slot_taken_within_the_grace_of_its_freeing_is_not_past_it() -> None:
    """The third task had waited 3 s when the second's slot freed; it took it 0.5 s
    later: idle beside a waiting task, but not for longer than a 1 s bound."""
    spans = [(0.0, 0.0, 5.0), (0.0, 0.0, 3.0), (0.0, 3.5, 6.0)]
    assert idle_while_queued(spans, 2, 0.0) == pytest.approx(0.5, abs=0.01)
    assert idle_while_queued(spans, 2, 1.0) == 0.0
