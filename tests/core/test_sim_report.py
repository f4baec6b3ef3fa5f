"""What a failing seed prints: the fewest faults that still break it, and the history of
the tasks its violations name (``sim/report.py``), without running a mesh."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sim import report


@dataclass
class Ran:
    ok: bool


def test_the_fewest_faults_are_those_without_which_the_seed_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A seed that breaks only while faults 0 and 2 both happen is replayed with those."""
    monkeypatch.setattr(report, "drawn", lambda seed, tasks: ["a", "b", "c"])
    tried = []

    def simulate(seed: int, tasks: int, schedule: list[str]) -> Ran:
        tried.append(schedule)
        return Ran(ok=not {"a", "c"} <= set(schedule))

    monkeypatch.setattr(report, "simulate", simulate)
    assert report.fewest_faults(7, 100) == [0, 2]
    assert tried == [["b", "c"], ["a", "c"], ["a"]]


def test_the_history_shown_is_the_named_tasks_last_events() -> None:
    events = [
        {"op": "submit", "phase": "ok", "agent": "load", "mono": 1.0, "dc": "w", "key": "t00001"},
        {"op": "run", "phase": "start", "agent": "w-1", "mono": 2.0, "dc": "w", "task": "t00002"},
        {"op": "run", "phase": "start", "agent": "w-2", "mono": 3.0, "dc": "w", "task": "t00001"},
    ]
    lines = report.around(events, ["liveness: t00001 is still RUNNING"])
    assert len(lines) == 2
    assert "submit ok key=t00001" in lines[0] and "w-2 run start task=t00001" in lines[1]
