"""Work conservation (``mesh.core.conserve``) and the view's idle set it reads: which
queued tasks go to idle agents of the DC. Pure: examples of each rule, then properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.core.conserve import MAX_MOVES, Move, Waiting, moves
from mesh.core.dcview import DcView
from mesh.core.routing import Member, Policy

A100 = 81920
NEEDS = ("sleep", "sdxl", 1, 0)


def member(agent_id: str, slots: int = 1, **fields: object) -> Member:
    defaults: dict[str, object] = {
        "gpu_memory_mb": (A100,) * slots,
        "pipelines": frozenset({"sleep"}),
        "queue_limit": 4,
    }
    return Member(agent_id, 1.0, **{**defaults, **fields})  # type: ignore[arg-type]


def dc(*members: Member, loads: dict[str, tuple[int, int]] | None = None) -> DcView:
    view = DcView(Policy())
    view.set_members(members)
    for agent_id, (running, queued) in (loads or {}).items():
        view.set_load(agent_id, running, queued)
    return view


def queue(*waits: float, needs: tuple[str, str, int, int] = NEEDS) -> list[Waiting]:
    return [Waiting(f"t{i}", needs, wait) for i, wait in enumerate(waits)]


def load_s(model: str) -> float:
    return 0.5


def test_the_view_knows_which_agents_have_a_slot_no_task_holds() -> None:
    view = dc(
        member("me", 2),
        member("busy"),
        member("free", 2),
        loads={"me": (2, 3), "busy": (1, 0), "free": (1, 0)},
    )
    assert view.idle == {"free"}
    view.set_load("free", 2, 0)
    view.set_load("busy", 0, 0)
    assert view.idle == {"busy"}
    view.update_members({"busy": member("busy", draining=True)})
    assert view.idle == set()


def test_the_longest_waits_go_to_idle_agents_and_each_takes_its_free_slots() -> None:
    """The user's case: six 20 s tasks sent to one agent of two slots, a DC of 2 + 1
    slots more idle: the three that would wait longest move; the next ones stay."""
    view = dc(member("me", 2), member("w2", 2), member("w3"), loads={"me": (2, 4)})
    found = moves(view, "me", queue(20, 20, 40, 40), load_s, margin_s=0.5)
    assert [(m.task_id, m.agent_id) for m in found] == [("t3", "w2"), ("t2", "w2"), ("t1", "w3")]
    assert all(m.start_s == 0.5 for m in found)  # the model is cold there: a load


def test_a_warm_agent_is_chosen_first_and_a_short_wait_is_not_worth_a_load() -> None:
    view = dc(member("me"), member("cold", 2), member("warm"), loads={"me": (1, 2)})
    view.set_loaded("warm", ["sdxl"])
    assert moves(view, "me", queue(0.8, 3.0), load_s, 0.5) == [Move("t1", "warm", 0.0)]
    # a wait shorter than a load plus the margin stays where it is
    assert (
        moves(dc(member("me"), member("cold"), loads={"me": (1, 1)}), "me", queue(0.9), load_s, 0.5)
        == []
    )


def test_no_move_to_a_suspect_an_ineligible_agent_or_oneself() -> None:
    view = dc(
        member("me", 2),
        member("suspect"),
        member("other-model", models=frozenset({"llama"})),
        member("small", gpu_memory_mb=(16384,)),
        loads={"me": (0, 2)},  # idle itself: its own slots are its executor's to fill
    )
    view.set_suspect("suspect", True)
    wide = ("sleep", "sdxl", 1, 40000)
    assert moves(view, "me", queue(9.0, 9.0, needs=wide), load_s, 0.5) == []


def test_a_wide_task_needs_as_many_free_slots_on_one_agent() -> None:
    view = dc(member("me"), member("a"), member("b"), member("c", 2), loads={"me": (1, 1)})
    found = moves(view, "me", queue(30.0, needs=("sleep", "sdxl", 2, 0)), load_s, 0.5)
    assert found == [Move("t0", "c", 0.5)]


names = st.sampled_from([f"a{i}" for i in range(8)])


@given(
    st.dictionaries(names, st.tuples(st.integers(1, 4), st.integers(0, 6), st.integers(0, 3))),
    st.lists(st.tuples(st.floats(0, 100), st.integers(1, 2)), max_size=30),
    st.sets(names),
)
def test_moves_never_overfill_an_agent_and_only_save_time(
    agents: dict[str, tuple[int, int, int]],
    waits: list[tuple[float, int]],
    warm: set[str],
) -> None:
    view = dc(
        member("me"),
        *(member(a, slots) for a, (slots, _, _) in agents.items()),
        loads={a: (running, queued) for a, (_, running, queued) in agents.items()},
    )
    for agent_id in warm & agents.keys():
        view.set_loaded(agent_id, ["sdxl"])
    waiting = [Waiting(f"t{i}", ("sleep", "sdxl", g, 0), w) for i, (w, g) in enumerate(waits)]
    found = moves(view, "me", waiting, load_s, 0.5)
    assert len(found) <= MAX_MOVES
    assert len({m.task_id for m in found}) == len(found)
    gpus = {w.task_id: w.needs[2] for w in waiting}
    for agent_id in {m.agent_id for m in found}:
        slots, running, queued = agents[agent_id]
        taken = sum(gpus[m.task_id] for m in found if m.agent_id == agent_id)
        assert running + queued + taken <= slots  # only the slots no task holds
    by_id = {w.task_id: w for w in waiting}
    assert all(by_id[m.task_id].wait_s > m.start_s + 0.5 for m in found)
    assert all(m.start_s == (0.0 if m.agent_id in warm else 0.5) for m in found)
