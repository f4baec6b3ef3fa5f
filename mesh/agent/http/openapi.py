"""The OpenAPI 3 document of the HTTP API, generated from the protos and the route table:
nothing here is kept by hand, so it cannot drift from what the agent serves.

Messages become schemas by protobuf's JSON mapping (what ``json_format`` reads and
writes): 64-bit integers and bytes (base64) as strings, enums by name, ``Timestamp`` as an
RFC 3339 string, ``Duration`` as seconds with an ``s``, maps as objects.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from mesh.agent.http.routes import HTTP_STATUS, ROUTES, Route, method_of

F = FieldDescriptor
SCALARS: dict[int, dict[str, Any]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
WELL_KNOWN = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
}
ERROR = {
    "type": "object",
    "properties": {
        "code": {"type": "integer", "description": "the gRPC status code"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["code", "message"],
}

NDJSON = "application/x-ndjson"


def _ref(message: Descriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if message.full_name in WELL_KNOWN:
        return dict(WELL_KNOWN[message.full_name])
    _schema(message, schemas)
    return {"$ref": f"#/components/schemas/{message.full_name}"}


def _field(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value, schemas)}
    single = _single(field, schemas)
    return {"type": "array", "items": single} if field.is_repeated else single


def _single(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.type == F.TYPE_MESSAGE:
        return _ref(field.message_type, schemas)
    if field.type == F.TYPE_ENUM:
        return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    return dict(SCALARS[field.type])


def _schema(message: Descriptor, schemas: dict[str, Any]) -> None:
    if message.full_name in schemas:
        return
    schemas[message.full_name] = {}  # taken before recursing: messages may nest themselves
    schemas[message.full_name] = {
        "type": "object",
        "properties": {f.json_name: _field(f, schemas) for f in message.fields},
    }
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            _schema(nested, schemas)


def _operation(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    method = method_of(route)
    request, response = method.input_type, method.output_type
    operation: dict[str, Any] = {
        "operationId": route.name,
        "tags": [route.rpc.strip("/").split("/")[0].rsplit(".", 1)[-1]],
        "x-grpc-method": route.rpc,
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.fields
        ],
        "responses": {
            "default": {
                "description": "an error, its HTTP status mapped from its gRPC code",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        },
        "security": [{"bearer": []}],
    }
    if route.body:
        kind = NDJSON if route.name == "SubmitStream" else "application/json"
        operation["requestBody"] = {
            "required": True,
            "content": {kind: {"schema": _ref(request, schemas)}},
        }
    else:
        for field in request.fields:
            if field.name not in route.fields and field.type != F.TYPE_MESSAGE:
                operation["parameters"].append(
                    {"name": field.json_name, "in": "query", "schema": _field(field, schemas)}
                )
            elif field.type == F.TYPE_MESSAGE and field.name not in route.fields:
                operation["parameters"] += _dotted(field, schemas)
    if route.stream and route.name == "GetResult":
        ok = {"description": "the result's bytes", "content": {"*/*": {}}}
    elif route.name == "SubmitStream":
        ok = {
            "description": f"one {response.name} (JSON) per line, as each is answered; a "
            "last line {'error': {code, message}} if the stream itself fails",
            "content": {NDJSON: {"schema": _ref(response, schemas)}},
        }
    elif route.stream:
        ok = {
            "description": f"Server-Sent Events, one {response.name} (JSON) per event",
            "content": {"text/event-stream": {"schema": _ref(response, schemas)}},
        }
    else:
        ok = {
            "description": "OK",
            "content": {"application/json": {"schema": _ref(response, schemas)}},
        }
    operation["responses"]["200"] = ok
    return operation


def _dotted(field: FieldDescriptor, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    """A message field of a GET request, as ``field.sub=value`` query parameters (scalar
    fields only, as grpc-gateway reads them)."""
    return [
        {
            "name": f"{field.json_name}.{sub.json_name}",
            "in": "query",
            "schema": _field(sub, schemas),
        }
        for sub in field.message_type.fields
        if sub.type != F.TYPE_MESSAGE and not sub.is_repeated
    ]


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": ERROR}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.verb.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "gpumesh",
            "version": "v1",
            "description": "Every agent serves this beside gRPC, with the same identities and "
            "roles (a bearer token). Generated from proto/ at run time. HTTP statuses map "
            "from gRPC codes as grpc-gateway maps them: "
            + ", ".join(
                f"{code} {status}" for code, status in HTTP_STATUS.items() if status != 200
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
