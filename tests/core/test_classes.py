"""Online and batch, pure: the default class, batch's own slots, and which runs are
preempted for online work (Kueue's order), never taking batch below its share."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.core.classes import BATCH, ONLINE, batch_slots, task_class
from mesh.core.preemption import Run, batch_may_start, victims
from mesh.v1 import tasks_pb2 as pb


def test_the_class_comes_from_the_spec_else_the_task_type() -> None:
    assert task_class(pb.TaskSpec(task_type=pb.TASK_TYPE_LLM)) == ONLINE
    assert task_class(pb.TaskSpec(task_type=pb.TASK_TYPE_TTS)) == ONLINE
    assert task_class(pb.TaskSpec(task_type=pb.TASK_TYPE_T2I)) == BATCH
    assert task_class(pb.TaskSpec()) == BATCH
    assert task_class(pb.TaskSpec(task_type=pb.TASK_TYPE_LLM, task_class=2)) == BATCH
    assert task_class(pb.TaskSpec(task_type=pb.TASK_TYPE_T2I, task_class=1)) == ONLINE


def test_online_share_is_rounded_in_onlines_favour() -> None:
    assert [batch_slots(n, 0.7) for n in (1, 2, 3, 4, 8, 10)] == [0, 0, 0, 1, 2, 3]
    assert batch_slots(8, 0.0) == 8 and batch_slots(8, 1.0) == 0


def batch(task_id: str, tenant: str = "t", started: float = 0.0, **kw: object) -> Run:
    return Run(task_id, BATCH, tenant, 1, started, **kw)  # type: ignore[arg-type]


def test_victims_heaviest_tenant_then_lowest_priority_then_newest() -> None:
    running = [
        batch("light", "b", started=9.0),
        batch("heavy-old", "a", started=1.0),
        batch("heavy-new", "a", started=5.0),
        batch("heavy-vip", "a", started=8.0, weight=8),
    ]
    # 8 slots, 2 of them batch's own: 2 borrowed; one online task needs 2 GPUs.
    assert victims(running, free=4, need=6, slots=8, online_share=0.75) == [
        "heavy-new",
        "heavy-old",
    ]


def test_the_tenant_furthest_over_its_share_gives_first() -> None:
    running = [
        batch("big-1", "big", started=1.0),
        batch("big-2", "big", started=2.0),
        batch("big-3", "big", started=3.0),
        batch("small-1", "small", started=9.0),
        batch("small-2", "small", started=8.0),
    ]
    # big holds 3, small 2: with equal shares big gives first; with big's share 2 (so 1.5
    # per unit of share against small's 2), small does.
    assert victims(running, free=0, need=1, slots=5, online_share=0.2) == ["big-3"]
    chosen = victims(running, free=0, need=1, slots=5, online_share=0.2, shares={"big": 2})
    assert chosen == ["small-1"]


def test_nothing_is_preempted_when_it_fits_or_cannot_be_made_to() -> None:
    running = [batch("a"), batch("b")]
    assert victims(running, free=1, need=1, slots=4, online_share=0.5) == []
    # batch holds only its own share: nothing is borrowed, nothing to take back
    assert victims(running, free=0, need=1, slots=2, online_share=0.0) == []
    # a run that asked not to be preempted stays
    keep = [batch("a", preemptible=False), batch("b", preemptible=False)]
    assert victims(keep, free=0, need=1, slots=2, online_share=1.0) == []


def test_a_run_that_may_not_be_preempted_starts_only_within_batchs_share() -> None:
    assert batch_may_start([], 1, slots=4, online_share=0.5)
    assert batch_may_start([batch("a")], 1, slots=4, online_share=0.5)
    assert not batch_may_start([batch("a"), batch("b")], 1, slots=4, online_share=0.5)
    online = Run("o", ONLINE, "t", 1, 0.0)
    assert batch_may_start([online, online, batch("a")], 1, slots=4, online_share=0.5)


runs = st.lists(
    st.builds(
        Run,
        st.uuids().map(str),
        st.sampled_from([ONLINE, BATCH]),
        st.sampled_from("abc"),
        st.integers(1, 2),
        st.floats(0, 100),
        st.integers(1, 8),
        st.booleans(),
    ),
    max_size=8,
)


@given(runs, st.integers(0, 4), st.integers(1, 4), st.floats(0, 1))
def test_preemption_frees_enough_and_never_cuts_into_batchs_share(
    running: list[Run], free: int, need: int, share: float
) -> None:
    slots = sum(r.gpus for r in running) + free
    chosen = victims(running, free, need, slots, share)
    by_id = {r.task_id: r for r in running}
    taken = [by_id[t] for t in chosen]
    assert all(r.task_class == BATCH and r.preemptible for r in taken)
    if chosen:
        assert free + sum(r.gpus for r in taken) >= need > free
        left = sum(r.gpus for r in running if r.task_class == BATCH) - sum(r.gpus for r in taken)
        assert left >= batch_slots(slots, share)
