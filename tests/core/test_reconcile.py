"""The queue owner's reconcile of a task recorded while its id's home could not be asked
(``Addressing.reconcile``), over the simulator's store and a scripted other DC."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mesh.agent.addressing import Addressing
from mesh.core import home
from mesh.core.clock import now_ms
from mesh.core.lifecycle import new_record
from mesh.core.task import spec_digest
from mesh.errors import TaskNotFound
from mesh.store.claims import ClaimStore
from mesh.store.keys import KeySpace
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb
from sim.kv import SimKv
from sim.loop import run

DCS = ("east", "west")
TASK_ID = home.id_homed_in("west", DCS, draw=iter(f"twin{n}" for n in range(99)).__next__)


@dataclass
class West:
    """The id's home (it holds west's claim) and west's answer for the task."""

    answers_in: str  # the DC west's answer says the task lives in ("" if west has none)
    digest: str
    asked: list[str] = field(default_factory=list)

    async def claim(self, dc: str, request: peer_pb2.ClaimRequest) -> peer_pb2.ClaimResponse:
        assert dc == "west" and not request.stale_holder
        return peer_pb2.ClaimResponse(
            held=True, dc="west", spec_digest=self.digest, claimed_at_ms=now_ms()
        )

    async def get(self, dc: str, task_id: str) -> pb.TaskStatus:
        self.asked.append(dc)
        if not self.answers_in:
            raise TaskNotFound("no such task", task_id=task_id)
        return pb.TaskStatus(task_id=task_id, dc=self.answers_in)


def reconciled(answers_in: str) -> tuple[list[tuple[str, str]], bool]:
    """East records TASK_ID unclaimed, west claimed it first; one reconcile round later:
    what east superseded (id, in favour of) and whether the id is still pending."""

    async def main() -> tuple[list[tuple[str, str]], bool]:
        keys, store = KeySpace("t", "east"), SimKv()
        tasks, claims = TaskStore(store, keys), ClaimStore(store, keys)
        spec = pb.TaskSpec(task_id=TASK_ID, pipeline="sleep", model="sdxl")
        digest = spec_digest(spec)
        record = new_record(
            spec, digest, now_ms() + 60_000, attempt=1, path=["east-1"], agent_id="east-1",
            dc="east", inline_payload_bytes=0,
        )  # fmt: skip
        await tasks.create(record, [claims.mark_unclaimed(TASK_ID)])
        west = West(answers_in, digest)
        addressing = Addressing("east", tasks, claims, west, lambda: DCS)  # type: ignore[arg-type]
        superseded: list[tuple[str, str]] = []

        async def supersede(task_id: str, dc: str, reason: str) -> None:
            superseded.append((task_id, dc))

        rounds = asyncio.create_task(addressing.reconcile(supersede))
        await asyncio.sleep(3.0)  # one round (RECONCILE_S) and its asking
        rounds.cancel()
        assert west.asked, "the holder was asked for its task"
        return superseded, TASK_ID in await claims.unclaimed(10)

    return run(main())


def test_a_copy_the_claims_holder_handed_here_is_kept() -> None:
    """CI's etcd-leader-kill: west claimed the id, then handed its Submit to east, where
    the same submission was already recorded unclaimed. East's copy is the task."""
    assert reconciled(answers_in="east") == ([], False)


def test_a_copy_the_claims_holder_runs_itself_is_the_duplicate() -> None:
    assert reconciled(answers_in="west") == ([(TASK_ID, "west")], False)


def test_a_holder_without_a_record_yet_leaves_the_copy_pending() -> None:
    """West may still be recording it: nothing is cancelled, and the next round asks again
    (a claim that stays without a record is taken over once stale)."""
    assert reconciled(answers_in="") == ([], True)
