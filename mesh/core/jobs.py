"""A task as it travels between placement, the owner and the executor, and how a run
ended: plain data, so nothing imports the executor just for a type."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.v1 import tasks_pb2 as pb


@dataclass(frozen=True, slots=True)
class Output:
    """What a pipeline returns: the result bytes and their media type."""

    data: bytes
    media_type: str = "application/octet-stream"


@dataclass(slots=True)
class Job:
    spec: pb.TaskSpec  # with its payload
    attempt: int
    deadline_ms: int
    path: list[str] = field(default_factory=list)
    enqueued_ms: int = 0  # when it first entered the DC's backlog: its age there

    @property
    def task_id(self) -> str:
        return self.spec.task_id


@dataclass(frozen=True, slots=True)
class Outcome:
    state: int
    output: Output | None = None
    error_code: str = ""
    error_message: str = ""
