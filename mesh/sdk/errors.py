"""Typed errors, one per status a call can end with: ``except NotFound`` rather than
comparing codes. Each is a ``mesh.errors.MeshError`` (its ``code`` the status name), and
``TaskFailed``/``TaskCancelled`` say how a task ended when its result was asked for."""

from __future__ import annotations

import grpc

from mesh import errors
from mesh.core import access
from mesh.v1 import tasks_pb2 as pb


class InvalidArgument(errors.InvalidTask):
    pass


class NotFound(errors.TaskNotFound):
    pass


class AlreadyExists(errors.TaskConflict):
    pass


class PermissionDenied(access.PermissionDenied):
    pass


class Unauthenticated(access.Unauthenticated):
    pass


class ResourceExhausted(errors.LimitExceeded):
    pass


class DeadlineExceeded(errors.DeadlinePassed):
    pass


class Unavailable(errors.Unavailable):
    pass


class FailedPrecondition(errors.NoResult):
    pass


class Aborted(errors.StaleWrite):
    pass


class Internal(errors.MeshError):
    code = "INTERNAL"


class Cancelled(errors.MeshError):
    code = "CANCELLED"


BY_CODE: dict[grpc.StatusCode, type[errors.MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_of(exc: grpc.aio.AioRpcError) -> errors.MeshError:
    """The typed error for a failed call (``Internal`` for any status not listed)."""
    return BY_CODE.get(exc.code(), Internal)(exc.details() or exc.code().name)


def error_named(code: str, message: str) -> errors.MeshError:
    """The typed error for a status named ``code`` (a ``TaskError``'s, as a stream's
    answer for one task carries it)."""
    status = grpc.StatusCode.__members__.get(code, grpc.StatusCode.INTERNAL)
    return BY_CODE.get(status, Internal)(message or code)


class TaskFailed(errors.MeshError):
    """The task ended without a result: ``status`` says how and why."""

    code = "ABORTED"

    def __init__(self, status: pb.TaskStatus) -> None:
        super().__init__(
            f"task {status.task_id} ended {pb.TaskState.Name(status.state)}: "
            f"{status.error.code} {status.error.message}".rstrip()
        )
        self.status = status


class TaskCancelled(TaskFailed):
    pass
