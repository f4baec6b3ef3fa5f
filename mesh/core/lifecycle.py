"""How a task's record is born and changes state, as pure functions on the record: its
first version, ending it, the queue owner's decision for a task whose agent died, and
the spec that runs a finished task again.
The etcd adapters apply them by compare-and-swap; tests apply them to plain records."""

from __future__ import annotations

from collections.abc import Iterable

from mesh.core.clock import now_ts
from mesh.core.jobs import Job
from mesh.core.task import TERMINAL
from mesh.errors import AlreadyPlaced, NotRerunnable, StaleWrite
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb


def new_record(
    spec: pb.TaskSpec,
    digest: str,
    deadline_ms: int,
    *,
    attempt: int,
    path: Iterable[str],
    agent_id: str,
    dc: str,
    inline_payload_bytes: int,
    traceparent: str = "",
    trace_id: str = "",
) -> peer_pb2.TaskRecord:
    """A task's first record in a DC: pending, and this agent's until it is placed, so
    that should the agent die first, the DC's owner finds it among its orphans. A
    payload over ``inline_payload_bytes`` is not kept (etcd is not a blob store): the
    task then cannot run again if the agent holding it dies."""
    status = pb.TaskStatus(
        task_id=spec.task_id,
        state=pb.TASK_STATE_PENDING,
        agent=agent_id,
        dc=dc,
        attempt=attempt,
        created_at=now_ts(),
        path=list(path),
        trace_id=trace_id,
    )
    status.spec.CopyFrom(spec)
    too_big = len(spec.payload) > inline_payload_bytes
    if too_big:
        status.spec.ClearField("payload")
    status.deadline.FromMilliseconds(deadline_ms)
    return peer_pb2.TaskRecord(
        status=status, spec_digest=digest, payload_not_kept=too_big, traceparent=traceparent
    )


def end(status: pb.TaskStatus, state: int, code: str, message: str) -> None:
    """Make ``status`` terminal now, saying why."""
    status.state = state
    status.finished_at.CopyFrom(now_ts())
    status.error.code, status.error.message = code, message


def claim_run(record: peer_pb2.TaskRecord, agent_id: str) -> None:
    """Make ``agent_id`` the agent of this attempt, unless another agent runs it now, or
    the task is being handed to (or was handed to) another DC: then ``StaleWrite``. A
    task placed twice must never run one attempt twice (a run that is interrupted or
    re-queued always gets a new attempt), so neither the losing placement's accept nor
    its start may take the record from the one that runs it, nor from the DC it left."""
    status = record.status
    if record.forwarded_to_dc:
        raise StaleWrite(f"handed to DC {record.forwarded_to_dc}", task_id=status.task_id)
    if status.state == pb.TASK_STATE_RUNNING and status.agent not in ("", agent_id):
        raise StaleWrite(f"attempt already running on {status.agent}", task_id=status.task_id)
    status.agent = agent_id


def being_placed(status: pb.TaskStatus) -> bool:
    """A task its Submit, an adoption or a hand-off is placing right now: its record may
    yet be taken back (deleted, or pointed elsewhere) if that fails, so nothing may be
    promised from it; a task the owner re-queued (no agent) is the DC's already."""
    return status.state == pb.TASK_STATE_PENDING and bool(status.agent)


def still_placing(record: peer_pb2.TaskRecord) -> None:
    """A placement's own write (a hand-off's intent, the backlog) holds only while its
    task waits for it. An agent of this DC that accepted or started it first took it
    through an offer whose answer was lost (``AlreadyPlaced``: it is placed there), and
    one waiting in the DC's backlog was put there by another placement of it (placed:
    an intent written over it would leave the entry to a record that names an agent,
    which the owner drops, and the agent holds nothing: sim seed 218); an ended task is
    nobody's to place (``StaleWrite``)."""
    status = record.status
    if status.state in TERMINAL:
        raise StaleWrite("the task has ended", task_id=status.task_id)
    if status.state in (pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING) and status.agent:
        raise AlreadyPlaced(status.agent, task_id=status.task_id)
    if status.state == pb.TASK_STATE_QUEUED and not status.agent and record.backlog_entry:
        # (Queued for no agent, with its entry: a record that moved on since may still
        # name an entry a claim deleted, seed 77.)
        raise AlreadyPlaced("backlog", task_id=status.task_id)


def requeue(record: peer_pb2.TaskRecord, dead_agent: str, max_attempts: int) -> str:
    """The owner's decision for a task whose agent died, applied to ``record``: "requeued"
    (attempt + 1, pending, no agent), "failed" (with the reason), or "" when the record
    has moved on and nothing is to be written."""
    status = record.status
    if status.state in TERMINAL or status.agent != dead_agent:
        return ""
    if record.payload_not_kept or status.attempt >= max_attempts:
        why = (
            "its payload was held only by that agent"
            if record.payload_not_kept
            else f"{status.attempt} of {max_attempts} attempts used"
        )
        message = f"agent {dead_agent} died running it; {why}"
        end(status, pb.TASK_STATE_FAILED, "UNAVAILABLE", message)
        return "failed"
    status.attempt += 1
    status.state = pb.TASK_STATE_PENDING
    status.agent = ""
    status.ClearField("progress")
    status.ClearField("started_at")
    return "requeued"


def requeued_job(status: pb.TaskStatus, traceparent: str) -> Job:
    """The job to place for a task re-queued after its agent died. It keeps its age:
    should it wait in the backlog, it goes before younger tasks of its class, rather
    than paying for its agent's death with a second wait."""
    return Job(
        status.spec,
        status.attempt,
        status.deadline.ToMilliseconds(),
        enqueued_ms=status.created_at.ToMilliseconds(),
        traceparent=traceparent,
    )


def again(record: peer_pb2.TaskRecord, new_task_id: str) -> pb.TaskSpec:
    """The spec of a new task that runs ``record``'s again: its spec and payload, the id
    ``new_task_id`` (empty: the agent names one), ``rerun_of`` the old task's, and no
    absolute deadline (the old one has passed; a relative ``timeout`` counts anew).
    Refused while the task is under way, and when its payload was not kept."""
    status = record.status
    if status.state not in TERMINAL:
        raise NotRerunnable(
            f"task {status.task_id} has not ended: wait for it, or cancel it first",
            state=pb.TaskState.Name(status.state),
        )
    if record.payload_not_kept:
        raise NotRerunnable(
            f"the payload of {status.task_id} was over the agents' inline_payload_bytes and "
            "was not kept: submit it again with its payload"
        )
    spec = pb.TaskSpec()
    spec.CopyFrom(status.spec)
    spec.task_id = new_task_id
    spec.rerun_of = status.task_id
    spec.ClearField("deadline")
    return spec
