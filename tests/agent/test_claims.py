"""Who may take a task's record, as pure functions on plain records: an agent's accept
or start, a placement's hand-off to another DC, its write into the backlog. Each case
is one the chaos matrix found on a seed nobody had tried (two DCs running one task)."""

from __future__ import annotations

import pytest

from mesh.agent.handoff import intent, pointed_to, unconfirmed
from mesh.core.lifecycle import claim_run, new_record, requeue, still_placing
from mesh.core.task import spec_digest
from mesh.errors import AlreadyPlaced, StaleWrite
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb


def record(state: int = pb.TASK_STATE_PENDING, agent: str = "w1") -> peer_pb2.TaskRecord:
    spec = pb.TaskSpec(task_id="t1", model="m", pipeline="sleep")
    made = new_record(
        spec, spec_digest(spec), 10**13, attempt=1, path=(), agent_id=agent, dc="west",
        inline_payload_bytes=1024,
    )  # fmt: skip
    made.status.state = state
    return made


def test_an_agent_takes_a_pending_or_queued_task() -> None:
    for state in (pb.TASK_STATE_PENDING, pb.TASK_STATE_QUEUED):
        taken = record(state)
        claim_run(taken, "w2")
        assert taken.status.agent == "w2"


def test_no_agent_takes_an_attempt_another_runs() -> None:
    running = record(pb.TASK_STATE_RUNNING, agent="w2")
    with pytest.raises(StaleWrite, match="already running on w2"):
        claim_run(running, "w3")
    claim_run(running, "w2")  # its own start, written again, stands


def test_no_agent_takes_a_task_handed_to_another_dc() -> None:
    for confirmed in (False, True):
        leaving = record()
        intent("east", "w1")(leaving)
        if confirmed:
            leaving.status.agent = ""
        with pytest.raises(StaleWrite, match="handed to DC east"):
            claim_run(leaving, "w2")


def test_a_hand_off_or_the_backlog_finds_a_task_an_agent_took_first() -> None:
    for state in (pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING):
        with pytest.raises(AlreadyPlaced) as placed:
            still_placing(record(state, agent="w3"))
        assert placed.value.agent == "w3"
    done = record(pb.TASK_STATE_SUCCEEDED)
    with pytest.raises(StaleWrite, match="ended"):
        intent("east", "w1")(done)
    still_placing(record(pb.TASK_STATE_QUEUED, agent=""))  # claimed from the backlog
    waiting = record(pb.TASK_STATE_QUEUED, agent="")
    waiting.backlog_entry = "normal/1800000009801-t1"  # another placement put it there
    with pytest.raises(AlreadyPlaced) as placed:
        intent("east", "w1")(waiting)  # seed 218: an intent over it lost the task
    assert placed.value.agent == "backlog"


def test_a_hand_off_of_a_requeued_task_names_its_holder() -> None:
    """The owner re-queues with no agent, then places: a hand-off that kept no agent read
    as a confirmed pointer, so the DC that had the task answered "not here" for it."""
    orphan = record(pb.TASK_STATE_RUNNING, agent="w9")
    assert requeue(orphan, "w9", max_attempts=3) == "requeued"
    assert orphan.status.agent == ""
    intent("east", "w1")(orphan)
    assert unconfirmed(orphan) and pointed_to(orphan) == ""
    assert orphan.status.agent == "w1"
