"""The backlog's pure core: entries, dispatch rounds that always end, verdicts on records,
and the owner's decision for a dead agent's task — no etcd, no clock."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from mesh.core import backlog
from mesh.core.backlog import Round, Verdict, Waiting, judge
from mesh.core.lifecycle import requeue
from mesh.core.priority import Traits, Weighted
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

NOW_MS = 1_800_000_000_000


def record(
    state: int = pb.TASK_STATE_QUEUED, agent: str = "", attempt: int = 1, **flags: object
) -> peer_pb2.TaskRecord:
    """A record of task "t" due a second after NOW_MS; ``flags`` are TaskRecord fields."""
    status = pb.TaskStatus(task_id="t", state=state, agent=agent, attempt=attempt)
    status.deadline.FromMilliseconds(NOW_MS + 1000)
    return peer_pb2.TaskRecord(status=status, **flags)  # type: ignore[arg-type]


def test_an_entry_holds_class_age_task_deadline_and_traits() -> None:
    value = backlog.entry_value(NOW_MS, Traits("vip", "research", "sleep/m", 2))
    entry = backlog.parse("vip/0000000001234-a-b", value)
    assert entry == Waiting(1234, "a-b", "vip", NOW_MS, "research", "sleep/m", 2)
    assert entry is not None and entry.traits == Traits("vip", "research", "sleep/m", 2)
    assert backlog.parse("vip/0000000001234-a", b"a") == Waiting(1234, "a", "vip", 0)
    for bad in ("vip", "vip/x-a", "/1-a", "vip/12"):
        assert backlog.parse(bad) is None


FIELDS = ["deadline_ms", "tenant", "kind", "gpus", "other"]
LONG = "x" * (backlog.MAX_TEXT + 1)
ANY_JSON = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.just(LONG)
)
hostile = st.binary(max_size=64) | st.dictionaries(st.sampled_from(FIELDS), ANY_JSON).map(
    json.dumps
)


@given(hostile)
def test_a_hostile_entry_value_leaves_safe_defaults(value: bytes | str) -> None:
    entry = backlog.parse("vip/0000000001234-a", value)
    assert entry is not None
    assert entry.gpus >= 1 and entry.deadline_ms >= 0
    assert len(entry.tenant) <= backlog.MAX_TEXT and len(entry.kind) <= backlog.MAX_TEXT


NORMAL = Traits("normal")


def test_only_entries_whose_deadline_passed_expire() -> None:
    entries = {
        "normal/0000000000001-late": backlog.entry_value(NOW_MS - 1, NORMAL),
        "normal/0000000000002-now": backlog.entry_value(NOW_MS, NORMAL),
        "normal/0000000000003-fresh": backlog.entry_value(NOW_MS + 1, NORMAL),
        "normal/0000000000004-unknown": b"unknown",
    }
    assert [w.task_id for w in backlog.expired(entries, NOW_MS)] == ["late", "now"]


def test_verdicts_follow_the_record() -> None:
    assert judge(record(), NOW_MS) is Verdict.DISPATCH
    assert judge(record(cancel_requested=True), NOW_MS) is Verdict.CANCEL
    assert judge(record(), NOW_MS + 1000) is Verdict.EXPIRE
    assert judge(record(pb.TASK_STATE_SUCCEEDED), NOW_MS) is Verdict.STALE
    assert judge(record(agent="w1"), NOW_MS) is Verdict.STALE  # placed meanwhile
    assert judge(record(pb.TASK_STATE_PENDING), NOW_MS) is Verdict.STALE  # being placed
    assert judge(record(forwarded_to_dc="east"), NOW_MS) is Verdict.STALE


entries = st.lists(
    st.tuples(st.sampled_from(["vip", "normal", "batch"]), st.integers(0, 10_000)),
    max_size=60,
    unique_by=lambda e: e[1],
)


@given(entries, st.integers(0, 20_000))
def test_a_round_hands_out_each_entry_once_then_ends(
    waiting: list[tuple[str, int]], now_s: int
) -> None:
    snapshot = {f"{c}/{at:013d}-t{at}": b"" for c, at in waiting}
    dispatching = Round(backlog.entries(snapshot), Weighted({"vip": 8, "normal": 2}, 30))
    handed = []
    while (w := dispatching.pop(now_s * 1000)) is not None:
        handed.append(w.task_id)
        assert len(handed) <= len(snapshot)
    assert sorted(handed) == sorted(f"t{at}" for _, at in waiting)
    assert len(dispatching) == 0


def test_a_refund_leaves_the_credit_as_if_nothing_was_popped() -> None:
    policy = Weighted({"vip": 8, "normal": 2}, 30)
    snapshot = {"vip/0000000000001-a": b"", "normal/0000000000002-b": b""}
    before = policy.snapshot()
    dispatching = Round(backlog.entries(snapshot), policy)
    assert dispatching.pop(3_000) is not None
    dispatching.refund()
    assert policy.snapshot() == before


def test_a_dead_agents_task_is_requeued_with_the_next_attempt() -> None:
    running = record(pb.TASK_STATE_RUNNING, agent="w1")
    running.status.progress.step = 3
    assert requeue(running, "w1", max_attempts=3) == "requeued"
    status = running.status
    assert (status.attempt, status.state, status.agent) == (2, pb.TASK_STATE_PENDING, "")
    assert not status.HasField("progress")


def test_requeue_fails_a_task_out_of_attempts_or_without_its_payload() -> None:
    spent = record(pb.TASK_STATE_RUNNING, agent="w1", attempt=3)
    assert requeue(spent, "w1", max_attempts=3) == "failed"
    assert "3 of 3 attempts" in spent.status.error.message
    unkept = record(pb.TASK_STATE_QUEUED, agent="w1", payload_not_kept=True)
    assert requeue(unkept, "w1", max_attempts=3) == "failed"
    assert unkept.status.error.code == "UNAVAILABLE"


def test_requeue_leaves_a_task_that_moved_on() -> None:
    moved = record(pb.TASK_STATE_QUEUED, agent="w2")
    ended = record(pb.TASK_STATE_SUCCEEDED, agent="w1")
    assert requeue(moved, "w1", max_attempts=3) == ""
    assert requeue(ended, "w1", max_attempts=3) == ""
    assert moved.status.attempt == ended.status.attempt == 1
