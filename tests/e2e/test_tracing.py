"""Traces across hops: a task submitted to one agent and run on another is one trace,
from the Submit to the run, in the agents' span files; ``meshctl trace`` reads it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from support import Cluster, eventually, sleep_spec, until_peers

from mesh import tracing
from mesh.cli.trace import waterfall
from mesh.client import MeshClient
from mesh.core.task import TERMINAL
from mesh.v1 import tasks_pb2 as pb

GOOD = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_traceparent_from_the_network_is_used_only_when_well_formed() -> None:
    assert tracing.trace_id(GOOD) == "0af7651916cd43dd8448eb211c80319c"
    zeros = "00-" + "0" * 32 + "-" + "0" * 16 + "-01"  # well formed, but no trace
    for hostile in ("", "00-zz-yy-01", GOOD + "-" + "0" * 100, zeros):
        assert tracing.trace_id(hostile) == ""


def test_a_waterfall_hangs_each_span_under_its_parent() -> None:
    spans = [
        {"trace_id": "t", "span_id": "a", "parent_id": "", "name": "Submit", "agent": "x",
         "start_unix_ns": 0, "end_unix_ns": 5_000_000, "attributes": {}},
        {"trace_id": "t", "span_id": "b", "parent_id": "a", "name": "run", "agent": "y",
         "start_unix_ns": 1_000_000, "end_unix_ns": 3_000_000,
         "attributes": {"task.attempt": 2}},
        {"trace_id": "t", "span_id": "c", "parent_id": "gone", "name": "orphan", "agent": "y",
         "start_unix_ns": 4_000_000, "end_unix_ns": 4_500_000, "attributes": {}},
    ]  # fmt: skip
    tree = waterfall("task", "t", spans)
    top = [str(node.label) for node in tree.children]
    assert top[0].startswith("[cyan]Submit[/] [dim]x[/] +0.0 ms, 5.0 ms")
    assert top[1].startswith("[cyan]orphan[/]")
    (run,) = tree.children[0].children
    assert str(run.label) == "[cyan]run[/] [dim]y[/] +1.0 ms, 2.0 ms task.attempt=2"


async def test_one_trace_from_submit_on_one_agent_to_the_run_on_another(
    cluster: Cluster, tmp_path: Path
) -> None:
    spans = tmp_path / "spans"
    front = cluster.start("front", models='["other"]', span_dir=spans, trace_sample_ratio=1)
    worker = cluster.start("worker", span_dir=spans, trace_sample_ratio=1)
    for agent in (front, worker):
        await until_peers(agent, ["front", "worker"])
    async with front.client() as client:
        reply = await client.submit(sleep_spec("traced", seconds=0.1, steps=1, model="sdxl"))
        trace_id = reply.status.trace_id
        assert len(trace_id) == 32
        await eventually(lambda: _ended(client, "traced"), what="the task to end")

    def names() -> set[tuple[str, str]]:
        return {(s["agent"], s["name"]) for s in tracing.read_spans(spans, trace_id)}

    wanted = {
        ("front", "/mesh.v1.TaskService/Submit"),
        ("front", "admit"),
        ("front", "place"),
        ("front", "/mesh.v1.PeerService/Offer"),  # the client's span of the hop
        ("worker", "/mesh.v1.PeerService/Offer"),  # and the receiver's
        ("worker", "queue wait"),
        ("worker", "run"),
        ("worker", "etcd txn"),
    }
    await eventually(lambda: wanted <= names(), what=f"spans {wanted}")
    found = {s["span_id"]: s for s in tracing.read_spans(spans, trace_id)}
    (run,) = [s for s in found.values() if s["name"] == "run"]
    chain = []
    while run:
        chain.append(run["name"])
        run = found.get(run["parent_id"])  # type: ignore[assignment]
    assert chain == ["run", "admit", "/mesh.v1.TaskService/Submit"]  # the record's parent
    assert run is None

    meshctl = [sys.executable, "-m", "mesh.cli", *cluster.cli_user()]
    process = await asyncio.create_subprocess_exec(
        *meshctl, "trace", "traced", "--spans", str(spans), "-e", front.address, "-o", "json",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)  # a hang guard
    printed = json.loads(out)
    assert {s["span_id"] for s in printed} == set(found)
    keys = {"trace_id", "span_id", "parent_id", "name", "agent", "start_unix_ns", "end_unix_ns"}
    assert all(keys | {"attributes"} == s.keys() for s in printed)


async def test_unsampled_traces_cost_no_spans_but_a_failed_or_slow_task_keeps_one(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Sampling at 0: a task that succeeds quickly leaves no span at all; one that fails,
    and one slower than trace_slow_s, each leave one ``task`` span in their trace, from
    Submit to end, naming why it was kept."""
    spans = tmp_path / "spans"
    agent = cluster.start("lone", span_dir=spans, trace_sample_ratio=0, trace_slow_s=0.5)
    await until_peers(agent, ["lone"])
    specs = {
        "quick": sleep_spec("quick", seconds=0, steps=1, model="sdxl"),
        "broken": sleep_spec("broken", seconds=0, steps=1, model="sdxl"),
        "slow": sleep_spec("slow", seconds=0.8, steps=1, model="sdxl"),
    }
    specs["broken"].params["seconds"] = "never"
    traces = {}
    async with agent.client() as client:
        for name, spec in specs.items():
            traces[name] = (await client.submit(spec)).status.trace_id
        for name in specs:
            await eventually(lambda n=name: _terminal(client, n), what=f"{name} to end")

    def kept(name: str) -> list[dict]:
        return tracing.read_spans(spans, traces[name])

    await eventually(lambda: kept("broken") and kept("slow"), what="the kept spans")
    (broken,) = kept("broken")
    assert broken["name"] == "task" and broken["attributes"]["task.kept"] == "failed"
    assert broken["attributes"]["error.code"] == "INVALID_ARGUMENT"
    (slow,) = kept("slow")
    assert slow["attributes"]["task.kept"] == "slow"
    assert int(slow["end_unix_ns"]) - int(slow["start_unix_ns"]) >= 0.8e9
    assert kept("quick") == []  # written with the others, had it been kept


async def _terminal(client: MeshClient, task_id: str) -> bool:
    return (await client.get(task_id)).state in TERMINAL


async def _ended(client: MeshClient, task_id: str) -> bool:
    return (await client.get(task_id)).state == pb.TASK_STATE_SUCCEEDED


def test_only_a_well_formed_traceparent_is_kept() -> None:
    assert tracing.checked(GOOD) == GOOD
    assert tracing.checked("00-zz-yy-01") == "" and tracing.checked("x" * 10_000) == ""
