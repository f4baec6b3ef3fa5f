"""The HTTP/JSON edge: each route of ``mesh.agent.http.routes`` served by the same
API facades (``mesh.agent.apis``) as gRPC, on the agent's own event loop.

aiohttp, because it serves from the running asyncio loop (no second loop or thread, so a
handler calls the agent's API as a gRPC servicer does), streams responses (Server-Sent
Events for Watch), and is maintained and typed. The caller is known by the bearer token
in ``Authorization`` only (no cookies: nothing for a cross-site request to ride on), checked
by the same verifier and the same rule table as gRPC. Requests and responses go through
protobuf's ``json_format``, so the protos stay the one schema; errors are
``{code, message, details}`` with the HTTP status grpc-gateway gives the gRPC code.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from mesh import tracing
from mesh.agent.apis import Apis
from mesh.agent.auth import identity_from_bearer
from mesh.agent.http.openapi import NDJSON, document
from mesh.agent.http.routes import HTTP_STATUS, ROUTES, TASKS, Route, method_of
from mesh.agent.status import status_for
from mesh.config import AgentConfig
from mesh.core.access import (
    ANYONE,
    Grant,
    Identity,
    PermissionDenied,
    Unauthenticated,
    authorize,
)
from mesh.core.task import media_type
from mesh.errors import InvalidTask, LimitExceeded
from mesh.trust.tokens import Verifier
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)
UI = Path(__file__).parent / "ui"
# The console is static files from this origin: scripts, styles and requests to it only.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_TRACE_TASKS = 8  # a trace is one task's (and its parents' hand-offs): ask about a few at most
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _aiohttp_path(path: str) -> str:
    """``{field}`` matches one segment up to a ``:verb`` suffix."""
    return re.sub(r"\{(\w+)\}", r"{\1:[^/:]+}", path)


def error_body(code: grpc.StatusCode, message: str) -> web.Response:
    status = HTTP_STATUS.get(code.name, 500)
    body = {"code": code.value[0], "message": message, "details": []}
    return web.json_response(body, status=status)


class Gateway:
    def __init__(self, cfg: AgentConfig, apis: Apis, verifier: Verifier | None) -> None:
        """``verifier`` checks bearer tokens; None means ``--insecure`` (every caller is
        ``ANYONE``)."""
        self._cfg = cfg
        self._apis = apis
        self._verifier = verifier
        self._max_body = cfg.max_payload_bytes * 2 + 65536  # a payload as JSON base64, and more
        self.app = web.Application(middlewares=[self._headers], client_max_size=self._max_body)
        for route in ROUTES:
            self.app.router.add_route(route.verb, _aiohttp_path(route.path), self._serve(route))
        self.app.router.add_get("/v1/openapi.json", self._openapi)
        self.app.router.add_get("/v1/traces/{trace_id}", self._trace)
        self.app.router.add_get("/", self._to_console)
        self.app.router.add_get("/ui", self._to_console)
        self.app.router.add_get("/ui/", self._console)
        self.app.router.add_static("/ui/", UI, follow_symlinks=False)
        self._runner: web.AppRunner | None = None

    # -- serving ---------------------------------------------------------------------------

    async def start(self, listen: str) -> str:
        """Listen on ``listen`` (TLS with the agent's certificate unless insecure) and
        return the URL it serves."""
        host, _, port = listen.rpartition(":")
        context = None
        if not self._cfg.insecure:
            assert self._cfg.tls_cert and self._cfg.tls_key
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self._cfg.tls_cert, self._cfg.tls_key)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port), ssl_context=context)
        await site.start()
        bound = self._runner.addresses[0][1]
        scheme = "http" if context is None else "https"
        advertised = self._cfg.http_advertise or f"{host or '127.0.0.1'}:{bound}"
        return f"{scheme}://{advertised}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        allowed = origin in self._cfg.http_cors_origins
        if request.method == "OPTIONS" and allowed:
            response: web.StreamResponse = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _as_json(exc) if request.path.startswith("/v1/") else exc
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        if not response.prepared:  # a stream has sent its headers already (set there)
            response.headers.update(SECURITY_HEADERS)
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    # -- who calls -------------------------------------------------------------------------

    def _identity(self, request: web.Request) -> Identity:
        if self._verifier is None:
            return ANYONE
        header = request.headers.get("Authorization")
        if header is None:
            raise Unauthenticated("no credential: send 'Authorization: Bearer <token>'")
        return identity_from_bearer(header, self._verifier)

    # -- the routes ------------------------------------------------------------------------

    def _serve(self, route: Route) -> Handler:
        method = method_of(route)
        request_type = message_factory.GetMessageClass(method.input_type)
        call = self._apis.method(_snake(route.name))

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                grant = authorize(self._identity(request), route.rpc)
                if route.name == "SubmitStream":
                    return await self._submit_stream(request, call(self._lines(request), grant))
                message = await self._request(route, request, request_type)
                if route.name == "Watch":
                    return await self._watch(request, call(message, grant))
                if route.name == "GetResult":
                    return await self._result(request, call(message, grant))
                with tracing.TRACER.start_as_current_span(f"HTTP {route.verb} {route.path}"):
                    reply = await call(message, grant)
            except json_format.ParseError as exc:
                return error_body(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {exc}")
            except web.HTTPException:
                raise  # aiohttp's own (a body over the limit): the middleware answers it
            except Exception as exc:
                return error_body(*status_for(exc))
            return _json(reply)

        return handle

    async def _request(self, route: Route, request: web.Request, kind: type[Message]) -> Message:
        message = kind()
        if route.body:
            raw = await request.read()
            if request.content_type == "application/octet-stream" and route.name == "Submit":
                self._raw_submit(message, request, raw)  # type: ignore[arg-type]
            else:
                try:
                    json_format.Parse(raw.decode() or "{}", message)
                except (UnicodeDecodeError, RecursionError) as exc:
                    raise json_format.ParseError(f"not JSON: {type(exc).__name__}") from None
        else:
            json_format.ParseDict(_nested(request.query), message)
        for name in route.fields:
            setattr(message, name, request.match_info[name])
        if route.name == "Watch" and not getattr(message, "resume_token", ""):
            resume = request.headers.get("Last-Event-ID", "")
            message.resume_token = resume  # type: ignore[attr-defined]
        return message

    @staticmethod
    def _raw_submit(message: pb.SubmitRequest, request: web.Request, raw: bytes) -> None:
        """``POST /v1/tasks`` with the payload as the body: the spec from the query."""
        json_format.ParseDict(_nested(request.query), message.spec)
        message.spec.payload = raw

    async def _watch(
        self, request: web.Request, events: AsyncIterator[pb.TaskEvent]
    ) -> web.StreamResponse:
        """Server-Sent Events: ``id`` is the resume token (a reconnecting EventSource sends
        it back as ``Last-Event-ID``); an error before the first event is a plain error."""
        iterator = aiter(events)
        first = await anext(iterator, None)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **SECURITY_HEADERS}
        )
        response.headers["Cache-Control"] = "no-store"
        await response.prepare(request)
        event: pb.TaskEvent | None = first
        try:
            while event is not None:
                data = json.dumps(json_format.MessageToDict(event), separators=(",", ":"))
                kind = pb.TaskEvent.Kind.Name(event.kind).removeprefix("KIND_").lower()
                frame = f"id: {event.resume_token}\nevent: {kind}\ndata: {data}\n\n"
                await response.write(frame.encode())
                event = await anext(iterator, None)
        except Exception as exc:
            code, text = status_for(exc)
            body = json.dumps({"code": code.value[0], "message": text, "details": []})
            await response.write(f"event: error\ndata: {body}\n\n".encode())
        await response.write_eof()
        return response

    async def _lines(self, request: web.Request) -> AsyncIterator[pb.SubmitStreamRequest]:
        """The NDJSON body's requests, read as they arrive; a line longer than a Submit's
        body may be, or one that is no request, ends the stream (INVALID_ARGUMENT)."""
        buffer, number = b"", 0
        async for chunk in request.content.iter_any():
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                number += 1
                if line.strip():
                    yield _request_line(line, number)
            if len(buffer) > self._max_body:
                raise LimitExceeded(f"line {number + 1} is longer than {self._max_body} bytes")
        if buffer.strip():
            yield _request_line(buffer, number + 1)

    async def _submit_stream(
        self, request: web.Request, answers: AsyncIterator[pb.SubmitStreamResponse]
    ) -> web.StreamResponse:
        """Each answer as one JSON line as soon as it comes (a client reads them while it
        sends, or sends no more than its socket buffers hold of answers); the stream's own
        failure as a last line ``{"error": {code, message}}``."""
        response = web.StreamResponse(headers={"Content-Type": NDJSON, **SECURITY_HEADERS})
        response.headers["Cache-Control"] = "no-store"
        await response.prepare(request)
        try:
            async for answer in answers:
                await response.write(_ndjson(json_format.MessageToDict(answer)))
        except Exception as exc:
            code, text = status_for(exc)
            await response.write(_ndjson({"error": {"code": code.value[0], "message": text}}))
        await response.write_eof()
        return response

    async def _result(
        self, request: web.Request, chunks: AsyncIterator[pb.ResultChunk]
    ) -> web.StreamResponse:
        """The result's bytes, streamed, with the media type of its first chunk."""
        iterator = aiter(chunks)
        first = await anext(iterator)
        response = web.StreamResponse(
            headers={
                "Content-Type": media_type(first.media_type),
                **SECURITY_HEADERS,
            }
        )
        await response.prepare(request)
        await response.write(first.data)
        async for chunk in iterator:
            await response.write(chunk.data)
        await response.write_eof()
        return response

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    async def _trace(self, request: web.Request) -> web.StreamResponse:
        """The spans of a trace from this agent's span files (the console's waterfall).
        Reading a trace is reading its task: the same rule as Get."""
        try:
            grant = authorize(self._identity(request), TASKS + "Get")
            wanted = request.match_info["trace_id"]
            if not TRACE_ID.fullmatch(wanted):
                raise InvalidTask("a trace id is 32 hex digits")
            folder = self._cfg.span_dir
            spans = tracing.read_spans(folder, wanted) if folder and folder.is_dir() else []
            if not grant.all_tasks:
                await self._may_read_trace(spans, grant)
        except Exception as exc:
            return error_body(*status_for(exc))
        return web.json_response({"spans": spans})

    async def _may_read_trace(self, spans: list[dict[str, object]], grant: Grant) -> None:
        """A caller that may read only its own tasks reads a trace only if it is one of
        its tasks' (as ``Get`` decides for that task); a trace of no task (or of none
        this mesh still knows) is nobody's to read. Trace ids are no secret: they are
        exemplars on every agent's ``/metrics``."""
        tasks = {
            task
            for span in spans
            if isinstance(attributes := span.get("attributes"), dict)
            and isinstance(task := attributes.get("task.id"), str)
        }
        if not tasks:
            raise PermissionDenied(f"{grant.identity} may read only its own tasks' traces")
        for task in sorted(tasks)[:MAX_TRACE_TASKS]:
            await self._apis.tasks.get(pb.GetRequest(task_id=task), grant)  # PERMISSION_DENIED

    async def _to_console(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def _console(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(UI / "index.html")


# aiohttp's own refusals of an API path, as grpc-gateway answers them: a JSON status.
ROUTING_STATUS = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _as_json(exc: web.HTTPException) -> web.StreamResponse:
    """A refusal aiohttp raised itself (no route, wrong verb, a body over the limit) with
    a JSON body, so a client of the API gets the body every other error of it has, in
    aiohttp's words; anything else as is."""
    code = ROUTING_STATUS.get(exc.status)
    if code is None:
        return exc
    body = {"code": code.value[0], "message": exc.text or exc.reason, "details": []}
    response = web.json_response(body, status=exc.status)
    if allow := exc.headers.get("Allow"):
        response.headers["Allow"] = allow
    return response


def _request_line(line: bytes, number: int) -> pb.SubmitStreamRequest:
    message = pb.SubmitStreamRequest()
    try:
        json_format.Parse(line.decode(), message)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidTask(f"line {number} is no SubmitStreamRequest: {exc}") from None
    return message


def _ndjson(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _json(reply: Message) -> web.Response:
    return web.json_response(json_format.MessageToDict(reply))


def _nested(query: Any) -> dict[str, Any]:
    """``spec.model=m&state=RUNNING`` as ``{"spec": {"model": "m"}, "state": "RUNNING"}``
    (repeated keys become lists)."""
    found: dict[str, Any] = {}
    for key in query:
        values = query.getall(key)
        node = found
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise json_format.ParseError(f"{key}: {part} is not a message")
            node = child
        node[leaf] = values[0] if len(values) == 1 else values
    return found
