"""Traces: a task's path across agents and DCs, as OpenTelemetry spans.

A task's trace starts with its Submit (or joins the caller's, when the call carries a W3C
``traceparent``). Every gRPC hop carries the context in its metadata (OpenTelemetry's
grpc.aio interceptors), and the task record keeps the ``traceparent`` of its admission,
so whatever picks the task up later — a queue owner after a requeue, another DC after a
hand-off, another agent after a preemption — continues the same trace.

Spans leave an agent through OTLP when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and as JSON lines in ``span_dir`` (the
local mesh's state folder) where ``meshctl trace`` reads them. Without a provider (meshctl,
the SDK) every span here is a no-op.

Recording every span of every task costs a busy agent a good part of its CPU, so a trace
is sampled where it begins (``trace_sample_ratio``, parent-based: a hop follows the flag
its caller's ``traceparent`` carries). What sampling would lose that matters, a task that
failed or took long, is kept at its end, tail-style: the agent that ends it records one
``task`` span over its whole life in its trace, through a provider that samples
everything (``keep_task``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from threading import Lock

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER = trace.get_tracer("gpumesh")
_KEEPER: trace.Tracer = trace.NoOpTracer()  # every span it makes is recorded: ``keep_task``
_PROPAGATOR = TraceContextTextMapPropagator()
MAX_FILE_BYTES = 64 << 20  # a span file is rotated (one old copy kept) past this
MAX_TRACEPARENT = 55  # "00-" 32 hex "-" 16 hex "-" 2 hex


def setup(
    agent_id: str, dc: str, span_dir: Path | None, ratio: float = 1.0
) -> list[TracerProvider]:
    """This process's tracer providers (to shut down at exit): the one every span goes
    through, sampling ``ratio`` of the traces begun here, and the one ``keep_task``
    records through; both export by OTLP if configured, to a span file if ``span_dir``."""
    global _KEEPER
    resource = Resource.create(
        {"service.name": "gpumesh-agent", "service.instance.id": agent_id, "gpumesh.dc": dc}
    )
    # OpenTelemetry's own OTEL_TRACES_SAMPLER, where an operator sets it, wins.
    ours = ParentBased(TraceIdRatioBased(ratio))
    sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else ours
    provider = TracerProvider(resource=resource, sampler=sampler)
    keeper = TracerProvider(resource=resource, sampler=ALWAYS_ON)
    for processor in _processors(agent_id, span_dir):
        provider.add_span_processor(processor)
    for processor in _processors(agent_id, span_dir):
        keeper.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _KEEPER = keeper.get_tracer("gpumesh.kept")
    return [provider, keeper]


def _processors(agent_id: str, span_dir: Path | None) -> list[SpanProcessor]:
    found: list[SpanProcessor] = []
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        found.append(BatchSpanProcessor(OTLPSpanExporter()))
    if span_dir is not None:
        exporter = SpanFile(span_dir / f"{agent_id}.jsonl", agent_id)
        found.append(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return found


def keep_task(
    parent: str, start_ns: int, end_ns: int, attributes: dict[str, str | int | float]
) -> None:
    """Record a task's whole life as one ``task`` span in its trace (the record's
    ``traceparent``), when sampling left that trace unrecorded."""
    context = joined(parent)
    if trace.get_current_span(context).get_span_context().trace_flags.sampled:
        return  # its spans are recorded already
    span = _KEEPER.start_span("task", context=context, start_time=start_ns, attributes=attributes)
    span.end(end_time=max(start_ns, end_ns))


def traceparent() -> str:
    """The current span's W3C ``traceparent`` ("" outside a recorded span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def joined(parent: str) -> context.Context:
    """A context whose span is the one ``parent`` names (a task record's or an envelope's
    field: hostile input, so anything malformed or overlong starts afresh)."""
    if not parent or len(parent) > MAX_TRACEPARENT:
        return context.Context()
    return _PROPAGATOR.extract({"traceparent": parent}, context=context.Context())


def checked(parent: str) -> str:
    """``parent`` if it is a well-formed ``traceparent`` naming a trace, else "": what a
    peer sends is kept in a record only when it means something."""
    return parent if trace_id(parent) else ""


def trace_id(parent: str) -> str:
    """The trace id a ``traceparent`` names, as 32 hex digits ("" if none)."""
    span = trace.get_current_span(joined(parent)).get_span_context()
    return format(span.trace_id, "032x") if span.is_valid else ""


def current_ids() -> tuple[str, str]:
    """Trace and span id of the current span, for log lines ("" outside one)."""
    span = trace.get_current_span().get_span_context()
    if not span.is_valid:
        return "", ""
    return format(span.trace_id, "032x"), format(span.span_id, "016x")


def as_json(span: ReadableSpan, agent: str) -> dict[str, object]:
    """One span as ``meshctl trace -o json`` prints it."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else "",
        "name": span.name,
        "agent": agent,
        "start_unix_ns": span.start_time,
        "end_unix_ns": span.end_time,
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
    }


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


class SpanFile(SpanExporter):
    """Spans as JSON lines in one file per agent, rotated at ``MAX_FILE_BYTES``."""

    def __init__(self, path: Path, agent: str) -> None:
        self._path = path
        self._agent = agent
        self._lock = Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(as_json(s, self._agent)) + "\n" for s in spans)
        with self._lock:
            try:
                if self._path.exists() and self._path.stat().st_size > MAX_FILE_BYTES:
                    self._path.replace(self._path.with_suffix(".jsonl.1"))
                with self._path.open("a") as out:
                    out.write(lines)
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


def read_spans(folder: Path, wanted: str) -> list[dict[str, object]]:
    """Every span of trace ``wanted`` in the span files under ``folder``, oldest first."""
    found = [span for span in _lines(folder, wanted) if span.get("trace_id") == wanted]
    return sorted(found, key=lambda s: int(s.get("start_unix_ns") or 0))  # type: ignore[call-overload]


def _lines(folder: Path, mentioning: str) -> Iterator[dict[str, object]]:
    """The spans whose line mentions ``mentioning``: only those are parsed (the console
    asks every second, and the files hold every trace of the mesh)."""
    for path in sorted(folder.glob("*.jsonl*")):
        with path.open() as spans:
            for line in spans:
                if mentioning not in line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a SIGKILL
