"""How each public RPC is reached over HTTP, in grpc-gateway's conventions.

A route names the RPC it serves (so the one access table applies), its verb and path
(``{field}`` binds a request field, ``:verb`` suffixes name custom methods, as
``google.api.http`` does), and whether the request comes as the JSON body or from the path
and query string. ``tests/e2e/test_http.py`` fails if a public RPC has no route. Pure data.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from google.protobuf.descriptor import MethodDescriptor

from mesh.v1 import tasks_pb2

PUBLIC_SERVICES = ("mesh.v1.TaskService", "mesh.v1.AgentService")  # PeerService: agents only


class Route(NamedTuple):
    verb: str
    path: str  # e.g. /v1/tasks/{task_id}:cancel
    rpc: str  # e.g. /mesh.v1.TaskService/Cancel
    body: bool  # the request message is the JSON body (else path and query)
    stream: bool = False  # a server stream: Server-Sent Events

    @property
    def name(self) -> str:
        return self.rpc.rsplit("/", 1)[-1]

    @property
    def fields(self) -> list[str]:
        """The request fields the path binds."""
        return re.findall(r"\{(\w+)\}", self.path)


TASKS, AGENTS = "/mesh.v1.TaskService/", "/mesh.v1.AgentService/"
ROUTES = (
    Route("POST", "/v1/tasks", TASKS + "Submit", body=True),
    # NDJSON both ways: a SubmitStreamRequest per line in, a SubmitStreamResponse per line out.
    Route("POST", "/v1/tasks:stream", TASKS + "SubmitStream", body=True, stream=True),
    Route("GET", "/v1/tasks/{task_id}", TASKS + "Get", body=False),
    Route("GET", "/v1/tasks", TASKS + "List", body=False),
    Route("POST", "/v1/tasks/{task_id}:cancel", TASKS + "Cancel", body=True),
    Route("POST", "/v1/tasks/{task_id}:rerun", TASKS + "Rerun", body=True),
    Route("GET", "/v1/tasks/{task_id}:watch", TASKS + "Watch", body=False, stream=True),
    Route("GET", "/v1/tasks/{task_id}:result", TASKS + "GetResult", body=False, stream=True),
    Route("GET", "/v1/agents", AGENTS + "ListAgents", body=False),
    Route("GET", "/v1/route", AGENTS + "Route", body=False),
    Route("GET", "/v1/queue", AGENTS + "Queue", body=False),
    Route("POST", "/v1/agents/self:drain", AGENTS + "Drain", body=True),
    Route("POST", "/v1/agents/self:undrain", AGENTS + "Undrain", body=True),
    Route("POST", "/v1/quota/{group}:split", AGENTS + "SplitQuota", body=True),
)


def public_rpcs() -> list[str]:
    """Every RPC of the public services, as the protos declare them."""
    found = []
    for service in tasks_pb2.DESCRIPTOR.services_by_name.values():
        if service.full_name in PUBLIC_SERVICES:
            found += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return found


def method_of(route: Route) -> MethodDescriptor:
    """The RPC's method descriptor (its input and output messages)."""
    service, name = route.rpc.strip("/").split("/")
    found = tasks_pb2.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[-1]]
    return found.methods_by_name[name]


# grpc-gateway's runtime.HTTPStatusFromCode.
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}
