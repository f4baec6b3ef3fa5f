"""Latency histograms on a real agent's /metrics: each there, in base units, with buckets
that fit what it measures, and counting the work the agent did."""

from __future__ import annotations

import asyncio
import urllib.request

from support import Cluster, eventually, sleep_spec

from mesh.core.task import TERMINAL
from mesh.local.localmesh import free_port

HISTOGRAMS = {  # name: (smallest bucket at most, largest at least), in seconds
    "gpumesh_submit_duration_seconds": (0.001, 5),
    "gpumesh_route_decision_seconds": (0.00001, 0.001),
    "gpumesh_offer_duration_seconds": (0.001, 5),
    "gpumesh_etcd_transaction_seconds": (0.001, 5),
    "gpumesh_queue_wait_seconds": (0.01, 600),
    "gpumesh_run_duration_seconds": (0.01, 600),
    "gpumesh_task_duration_seconds": (0.01, 600),
    "gpumesh_event_loop_lag_seconds": (0.001, 1),
}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def buckets(text: str, name: str) -> list[float]:
    bounds = [
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith(f"{name}_bucket")
    ]
    return sorted({float(b) for b in bounds if b != "+Inf"})


def count(text: str, name: str) -> float:
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}_count")
    )


async def test_every_latency_histogram_is_exported_and_counts_a_task(cluster: Cluster) -> None:
    port = free_port()
    agent = cluster.start("measured", metrics_listen=f"127.0.0.1:{port}", fake_gpus="2xA100-80GB")
    async with agent.client() as client:
        await client.submit(sleep_spec("timed", seconds=0.1, steps=1, model="m"))

        async def ended() -> bool:
            return (await client.get("timed")).state in TERMINAL

        await eventually(ended, what="the task to end")
    text = await asyncio.to_thread(scrape, port)
    for name, (smallest, largest) in HISTOGRAMS.items():
        found = buckets(text, name)
        assert found, f"{name} is not exported"
        assert found[0] <= smallest and found[-1] >= largest, (name, found)
    for name in (
        "gpumesh_submit_duration_seconds",
        "gpumesh_route_decision_seconds",
        "gpumesh_etcd_transaction_seconds",
        "gpumesh_queue_wait_seconds",
        "gpumesh_run_duration_seconds",
        "gpumesh_task_duration_seconds",
    ):
        assert count(text, name) >= 1, f"{name} counted nothing"
