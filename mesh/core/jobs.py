"""A task as it travels between placement, the owner and the executor, and how a run
ended: plain data, so nothing imports the executor just for a type."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.core import classes
from mesh.core.priority import Traits
from mesh.v1 import tasks_pb2 as pb


def traits(spec: pb.TaskSpec) -> Traits:
    """What a priority policy may know of a task: its class, tenant, kind and size."""
    return Traits(
        spec.queue,
        spec.user.group or spec.user.id,
        f"{spec.pipeline}/{spec.model}",
        max(1, spec.gpu_count),
        classes.task_class(spec),
    )


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
    traceparent: str = ""  # the task's trace (W3C), from its record
    # Seconds it waited queued on the agent it moved from (work conservation), for the
    # queue it joins next to keep its place; carried once, then back to 0.
    waited_s: float = 0.0

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def traits(self) -> Traits:
        return traits(self.spec)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: int
    output: Output | None = None
    error_code: str = ""
    error_message: str = ""
