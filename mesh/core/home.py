"""Where a task id lives, mesh-wide: its home DC. Pure.

Task ids are chosen by clients (they are the idempotency key), so nothing in an id says
which DC recorded it. Every id has a *home*: one DC of the topology, drawn from the id
alone by rendezvous hashing, so every agent of every DC agrees without asking anyone.
The home keeps a write-once *claim* for the id naming the DC that recorded the task (the
first DC to claim it holds it, mesh-wide); any agent finds a task by asking the home,
and a Submit through a second DC finds the first one's task there.

Rendezvous rather than a ring: the DCs are few, and when one joins or leaves only the
ids homed in it move, each to its next-ranked DC, which ``ranked`` gives in order.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from mesh.core.ring import key_point


def ranked(task_id: str, dcs: Iterable[str]) -> list[str]:
    """The DCs in the order ``task_id`` prefers them: its home first."""
    return sorted(dcs, key=lambda dc: (key_point(f"{task_id}@{dc}"), dc), reverse=True)


def home_dc(task_id: str, dcs: Iterable[str]) -> str:
    """The home of ``task_id`` among ``dcs`` (which must not be empty)."""
    order = ranked(task_id, dcs)
    if not order:
        raise ValueError("a home needs at least one DC")
    return order[0]


def id_homed_in(
    dc: str, dcs: Iterable[str], draw: Callable[[], str] = lambda: uuid.uuid4().hex
) -> str:
    """A fresh id whose home is ``dc``: a Submit without an id then needs no claim
    elsewhere. About ``len(dcs)`` draws; bounded, falling back to a plain draw (whose
    claim then goes to its home like a client's id would)."""
    known = sorted(set(dcs) | {dc})
    for _ in range(64 * len(known)):
        candidate = draw()
        if home_dc(candidate, known) == dc:
            return candidate
    return draw()
