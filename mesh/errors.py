"""One error root for the mesh, and the one table that turns it into gRPC status codes.

Domain code raises ``MeshError`` subclasses with structured fields; only the gRPC edge
(``mesh.service``) maps them to status codes, through ``grpc_code``.
"""

from __future__ import annotations

from typing import Any

import grpc


class MeshError(Exception):
    """Root of every error the mesh raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

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

    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(MeshError):
    """A configured limit (payload size, queue length, ...) refuses the request."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlinePassed(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class TaskNotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class TaskConflict(MeshError):
    """A client task id was reused for a different task."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NoCapacity(MeshError):
    """No agent could take the task now; the client should retry after a while."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(MeshError):
    """etcd or a peer cannot be reached; the call may succeed if retried."""

    code = grpc.StatusCode.UNAVAILABLE


class Unsure(Unavailable):
    """A write failed in a way that does not say whether etcd applied it (a timeout):
    the caller must read before it acts as if nothing was written."""


class StaleWrite(MeshError):
    """A write lost a compare-and-swap: someone else changed the record first."""

    code = grpc.StatusCode.ABORTED


class ConfigError(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
