"""What a failing seed prints: the fewest of its faults that still break it, and the
history of the tasks its violations name, so a bug is read from the terminal before any
file is opened."""

from __future__ import annotations

import re

from chaos.checker import Event
from sim.run import drawn, simulate

TASK = re.compile(r"\bt\d{5}\b")
TASKS_SHOWN = 3  # the first tasks a verdict names
EVENTS_SHOWN = 12  # the last events of each


def fewest_faults(seed: int, tasks: int) -> list[int]:
    """Indices into the seed's drawn schedule of a smallest set that still fails: each
    fault left out in turn, and kept out if the seed fails without it (greedy; a seed
    draws at most three, so at most three more runs)."""
    schedule = drawn(seed, tasks)
    kept = list(range(len(schedule)))
    for index in range(len(schedule)):
        trial = [k for k in kept if k != index]
        if not simulate(seed, tasks, schedule=[schedule[k] for k in trial]).ok:
            kept = trial
    return kept


def around(events: list[Event], violations: list[str]) -> list[str]:
    """The last events of the first tasks ``violations`` name, one line each."""
    named = list(dict.fromkeys(TASK.findall(" ".join(violations))))[:TASKS_SHOWN]
    lines = []
    for task in named:
        mine = [e for e in events if task in (e.get("task"), e.get("key"))]
        lines += [line(e) for e in mine[-EVENTS_SHOWN:]]
    return lines


def line(event: Event) -> str:
    shown = {"op", "phase", "agent", "mono", "dc"}
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in shown)
    when = float(event["mono"])  # type: ignore[arg-type]
    return f"{when:9.3f} {event['agent']:>7} {event['op']} {event['phase']} {rest}"
