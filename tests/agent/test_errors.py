"""Errors carry a status name and no transport; the gRPC edge maps every name to a code."""

from __future__ import annotations

import grpc

from mesh import errors
from mesh.agent.service import status_for


def every_error() -> list[type[errors.MeshError]]:
    found, todo = [], [errors.MeshError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_names_a_grpc_status() -> None:
    for cls in every_error():
        assert cls.code in grpc.StatusCode.__members__, f"{cls.__name__}.code = {cls.code!r}"


def test_the_edge_maps_names_to_codes_and_hides_bugs() -> None:
    assert status_for(errors.TaskNotFound("gone", task_id="t")) == (
        grpc.StatusCode.NOT_FOUND,
        "gone (task_id=t)",
    )
    assert status_for(errors.PipelineError("exit 3", "ABORTED"))[0] == grpc.StatusCode.ABORTED
    assert status_for(KeyError("secret detail")) == (grpc.StatusCode.INTERNAL, "internal error")
