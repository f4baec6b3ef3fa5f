"""The DC's durable backlog: tasks waiting for capacity, in etcd, one key per task.

``/{prefix}/{dc}/backlog/{class}/{enqueued_ms}-{task_id}``: the key alone says the class
and the age, so the queue owner orders the backlog from a mirror of the keys, with the
same ``Discipline`` as every agent's local queue (weights, and aging so nothing starves).
A task enters with its record in one transaction; only the owner takes it out, fenced by
its leadership, so a task leaves the backlog once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.queue import Discipline


@dataclass(frozen=True, slots=True, order=True)
class Waiting:
    enqueued_ms: int
    task_id: str
    queue_class: str


def parse(name: str) -> Waiting | None:
    """A backlog key's tail (``class/enqueued-task``); None if it is not one of ours."""
    queue_class, _, rest = name.partition("/")
    stamp, _, task_id = rest.partition("-")
    if not queue_class or not task_id or not stamp.isdigit():
        return None
    return Waiting(int(stamp), task_id, queue_class)


def by_class(names: Mapping[str, object]) -> dict[str, list[Waiting]]:
    """The backlog per class, oldest first."""
    classes: dict[str, list[Waiting]] = {}
    for name in names:
        waiting = parse(name)
        if waiting is not None:
            classes.setdefault(waiting.queue_class, []).append(waiting)
    for entries in classes.values():
        entries.sort()
    return classes


def next_up(
    classes: Mapping[str, list[Waiting]], discipline: Discipline, now_ms: int
) -> Waiting | None:
    """The entry to dispatch next, by weight and age (updates the discipline's credits)."""
    heads = {c: entries[0].enqueued_ms / 1000 for c, entries in classes.items() if entries}
    chosen = discipline.choose(heads, now_ms / 1000)
    return classes[chosen][0] if chosen is not None else None
