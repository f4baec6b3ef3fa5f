"""Decisions the simulator found wrong once a backlog, caps and new faults were in play:
an offer answered by a second seed after the first timed out, an election's fence out
of office, and a hand-off of a task whose cancel was asked for. Each over the simulator's
store or a scripted peer; no process starts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from mesh.agent.handoff import intent
from mesh.agent.remote import RemoteDcs
from mesh.errors import CancelAsked, DeadlinePassed, MeshError, Unavailable
from mesh.store import kv
from mesh.store.election import Election
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb
from sim.kv import SimKv
from sim.loop import run


@dataclass
class Seeds:
    """Peers of DC east: each seed answers an offer as scripted (an error, or accepted)."""

    answers: dict[str, MeshError | bool]
    asked: list[str] = field(default_factory=list)

    async def offer(
        self, address: str, dc: str, envelope: peer_pb2.Envelope, timeout_s: float
    ) -> peer_pb2.OfferResponse:
        self.asked.append(address)
        answer = self.answers[address]
        if isinstance(answer, MeshError):
            raise answer
        return peer_pb2.OfferResponse(accepted=answer, reason="" if answer else "east is full")


def offered(answers: dict[str, MeshError | bool]) -> peer_pb2.OfferResponse:
    seeds = Seeds(answers)
    remote = RemoteDcs(seeds)  # type: ignore[arg-type]
    remote.set_seeds({"east": list(answers)})
    remote.seeds = lambda dc, task_id: list(answers)  # type: ignore[method-assign]
    envelope = peer_pb2.Envelope(spec=pb.TaskSpec(task_id="t1"))
    return run(remote.offer("east", envelope))


def test_a_refusal_after_a_seed_that_timed_out_is_no_answer() -> None:
    """Seed 94: the first seed was paused, took the offer when it woke and recorded the
    task; the second refused, and the origin ran the task itself, leaving the first's
    copy PENDING for ever. A refusal that follows a seed in doubt must be settled."""
    late = DeadlinePassed("deadline exceeded")
    with pytest.raises(Unavailable):
        offered({"east-1": late, "east-2": False})


def test_an_answer_with_no_doubt_before_it_stands() -> None:
    assert offered({"east-1": False}).accepted is False
    assert offered({"east-1": DeadlinePassed("slow"), "east-2": True}).accepted is True


def test_an_election_fence_out_of_office_never_holds() -> None:
    """Seed 6: a settle that outlived its owner's term re-queued a task with the fence
    of an owner that had resigned: ``create(b"") == 0`` holds (no such key)."""

    async def main() -> tuple[bool, bool]:
        store = SimKv()
        lease = await store.grant(30)
        election = Election(store, b"/e/west", lambda: lease, b"west-1")
        await election.campaign()
        leading = await store.txn([election.fence()], [kv.Put(b"/x", b"1")])
        await election.resign()
        resigned = await store.txn([election.fence()], [kv.Put(b"/x", b"2")])
        return leading.succeeded, resigned.succeeded

    assert run(main()) == (True, False)


def test_a_task_whose_cancel_was_asked_for_is_not_handed_to_another_dc() -> None:
    """Seed 67: the owner took a task from the backlog, a Cancel was written and answered
    PENDING, then the owner handed the task to the other DC, which never saw the cancel
    and ran it to success."""
    record = peer_pb2.TaskRecord(
        status=pb.TaskStatus(task_id="t1", state=pb.TASK_STATE_PENDING, agent="east-1"),
        cancel_requested=True,
    )
    with pytest.raises(CancelAsked):
        intent("west", "east-1")(record)
    assert not record.forwarded_to_dc
