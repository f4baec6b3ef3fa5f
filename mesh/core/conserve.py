"""Work conservation inside a DC: which tasks queued on this agent an idle agent of the
DC should run instead. Pure.

Binding a task to an agent when the agent accepts it is early: a task queued behind a
long run waits while another agent of its DC has a slot free. Sparrow binds a task only
when a worker is free to run it; Ray spills a queued task back when it cannot run where
it is. Here the agent holding a queue looks at the DC's loads as gossip last told them
(the view's ``idle`` set, kept as loads change) and re-offers to an idle agent each task
that would wait here longer than it would take to start there: a model load if the model
is cold there, nothing if it is warm, plus a margin for a view a gossip round old. The
longest waits (the end of the queue's order) go first; an idle agent takes no more than
its free slots; a warm agent, then the freest, is chosen.

The move itself is the receiving agent's accept, a compare-and-swap on the task's record
that names it; a race with this agent starting the task after all is settled by the start
write (an attempt's first start wins, the other is refused), so a task never runs twice
because it moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.core.dcview import DcView, Needs
from mesh.core.routing import eligible

MAX_MOVES = 16  # per round: a queue longer than this empties over a few rounds


@dataclass(frozen=True, slots=True)
class Waiting:
    """A task queued here: what it needs (``Request.needs``) and when it should start."""

    task_id: str
    needs: Needs
    wait_s: float


@dataclass(frozen=True, slots=True)
class Move:
    """Offer ``task_id`` to ``agent_id``, where it should start in ``start_s``."""

    task_id: str
    agent_id: str
    start_s: float


def moves(
    view: DcView,
    me: str,
    waiting: Sequence[Waiting],
    load_s: Callable[[str], float],
    margin_s: float,
) -> list[Move]:
    """The moves that start ``waiting`` tasks (in the order they would start here) sooner
    on idle agents of the DC; ``load_s`` is a model's load time."""
    free = {
        a: view.members[a].slots - view.loads[a].tasks
        for a in sorted(view.idle - view.suspects - {me})
    }
    found: list[Move] = []
    for task in reversed(waiting):
        if not free or len(found) >= MAX_MOVES:
            break
        best = _soonest(view, task, free, load_s)
        if best is None or task.wait_s <= best.start_s + margin_s:
            continue
        found.append(best)
        free[best.agent_id] -= task.needs[2]
        if free[best.agent_id] <= 0:
            del free[best.agent_id]
    return found


def _soonest(
    view: DcView, task: Waiting, free: dict[str, int], load_s: Callable[[str], float]
) -> Move | None:
    """The idle agent where ``task`` would start soonest: warm, then the most slots free,
    then by id (so the same view always gives the same answer)."""
    _, model, gpus, _ = task.needs
    best: tuple[float, int, str] | None = None
    for agent_id, left in free.items():
        if left < gpus or not eligible(view.members[agent_id], task.needs):
            continue
        start_s = 0.0 if model in view.loaded[agent_id] else load_s(model)
        key = (start_s, -left, agent_id)
        if best is None or key < best:
            best = key
            if start_s == 0.0 and len(free) > 64:
                break  # warm with room: nothing starts sooner; a big DC is not scanned
    return None if best is None else Move(task.task_id, best[2], best[0])
