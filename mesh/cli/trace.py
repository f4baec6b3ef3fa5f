"""``meshctl trace ID``: where a task spent its time, across agents and DCs.

The task's status (from any agent of its DC) names its trace; the spans come from the
span files the agents write (``span_dir``: the local mesh's ``spans/`` folder by default,
or wherever ``--spans`` points, e.g. a copy gathered from a fleet's hosts). A fleet that
exports OTLP reads the same trace in its collector's backend (Jaeger, Tempo).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.tree import Tree

from mesh.cli.common import (
    EndpointOpt,
    HomeOpt,
    Output,
    OutputOpt,
    call,
    console,
    fail,
    resolve_endpoint,
)
from mesh.local import localmesh
from mesh.tracing import read_spans

app = typer.Typer()
SHOWN = ("task.attempt", "task.pipeline", "task.model", "gpu.slots", "placed", "route.reason")

Span = dict[str, object]


@app.command()
def trace(
    task_id: str,
    spans: Annotated[
        Path | None, typer.Option(help="folder of span files; default: the local mesh's")
    ] = None,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """A task's spans as a waterfall (or -o json: a list of spans)."""
    status = call(resolve_endpoint(endpoint, home), lambda c: c.get(task_id))
    if not status.trace_id:
        raise fail(f"{task_id} has no trace (it was recorded before tracing, or elsewhere)")
    found = read_spans(spans or localmesh.spans_of(home), status.trace_id)
    if output is not Output.table:
        print(json.dumps(found, indent=2))
        return
    if not found:
        raise fail(f"no spans of trace {status.trace_id} under {spans or 'the local mesh'} yet")
    console.print(waterfall(task_id, status.trace_id, found))


def _ns(span: Span, key: str) -> int:
    value = span.get(key)
    return value if isinstance(value, int) else 0


def waterfall(task_id: str, trace_id: str, found: list[Span]) -> Tree:
    """Spans under their parents, each with its offset from the trace's start, its
    duration and its agent; a span whose parent is not among them hangs at the root."""
    start = min(_ns(s, "start_unix_ns") for s in found)
    ids = {s["span_id"] for s in found}
    children: dict[object, list[Span]] = {}
    for span in found:
        parent = span["parent_id"] if span["parent_id"] in ids else None
        children.setdefault(parent, []).append(span)
    tree = Tree(f"[bold]{task_id}[/] trace {trace_id}")

    def grow(node: Tree, parent: object) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: _ns(s, "start_unix_ns")):
            offset = (_ns(span, "start_unix_ns") - start) / 1e6
            took = (_ns(span, "end_unix_ns") - _ns(span, "start_unix_ns")) / 1e6
            attributes = span.get("attributes") or {}
            assert isinstance(attributes, dict)
            extra = " ".join(f"{k}={attributes[k]}" for k in SHOWN if k in attributes)
            label = (
                f"[cyan]{span['name']}[/] [dim]{span['agent']}[/] "
                f"+{offset:.1f} ms, {took:.1f} ms {extra}"
            )
            grow(node.add(label), span["span_id"])

    grow(tree, None)
    return tree
