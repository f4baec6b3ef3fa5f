"""One error root for the mesh, with no transport in it.

Domain code raises ``MeshError`` subclasses with structured fields. Each carries ``code``:
the name of the status a caller should see (a gRPC status code name, as in
``google.rpc.Code``: ``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``…). Only the edges turn the
name into their own terms: the gRPC servicers into ``grpc.StatusCode``, the HTTP edge
into an HTTP status. So the pure core raises these without importing a transport.
"""

from __future__ import annotations

from typing import Any


class MeshError(Exception):
    """Root of every error the mesh raises on purpose."""

    code: str = "INTERNAL"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        if not self.fields:
            return self.message
        extra = ", ".join(f"{k}={v}" for k, v in sorted(self.fields.items()))
        return f"{self.message} ({extra})"


class InvalidTask(MeshError):
    """The request is malformed or names something this mesh does not know."""

    code = "INVALID_ARGUMENT"


class LimitExceeded(MeshError):
    """A configured limit (payload size, queue length, ...) refuses the request."""

    code = "RESOURCE_EXHAUSTED"


class DeadlinePassed(MeshError):
    code = "DEADLINE_EXCEEDED"


class TaskNotFound(MeshError):
    code = "NOT_FOUND"


class TaskConflict(MeshError):
    """A client task id was reused for a different task."""

    code = "ALREADY_EXISTS"


class NoCapacity(MeshError):
    """No agent could take the task now; the client should retry after a while."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(MeshError):
    """etcd or a peer cannot be reached; the call may succeed if retried."""

    code = "UNAVAILABLE"


class Unsure(Unavailable):
    """A write failed in a way that does not say whether etcd applied it (a timeout):
    the caller must read before it acts as if nothing was written."""


class NoResult(MeshError):
    """The task has no result to give (yet, or ever: it did not succeed)."""

    code = "FAILED_PRECONDITION"


class NotRerunnable(MeshError):
    """The task cannot be run again: it has not ended, or its payload was not kept."""

    code = "FAILED_PRECONDITION"


class StaleWrite(MeshError):
    """A write lost a compare-and-swap: someone else changed the record first."""

    code = "ABORTED"


class AlreadyPlaced(StaleWrite):
    """A placement's own write found its task taken by an agent of this DC: an offer
    whose answer was lost landed after all, so the task is placed there."""

    def __init__(self, agent: str, **fields: Any) -> None:
        super().__init__(f"already placed on {agent}", agent=agent, **fields)
        self.agent = agent


class CancelAsked(StaleWrite):
    """A hand-off's intent found a cancel asked for: the task ends where it is, never
    carried to a DC that would not see the request."""


class QuotaBusy(StaleWrite):
    """A start lost the race for its tenant's quota slot: the task waits for the next."""


class ConfigError(MeshError):
    code = "FAILED_PRECONDITION"


class PipelineError(MeshError):
    """A task failed for a reason its user should read (bad params, an exit code...);
    ``code`` names the status recorded with the task."""

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION", **fields: Any) -> None:
        super().__init__(message, **fields)
        self.code = code


class BadPacket(MeshError):
    """A gossip datagram was dropped; ``reason`` says why (it labels the drop counter)."""

    code = "INVALID_ARGUMENT"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
