"""Model placement on real agents: GPU memory holds so many models and the least useful
is evicted; every agent computes the DC's plan from gossip and warms, while idle, a model
the plan gives it; ``meshctl models`` shows demand, homes and moves."""

from __future__ import annotations

import asyncio
import json
import sys

from support import USER, Cluster, eventually, sleep_spec, until_peers, wait_log

from mesh.cli.fleet import model_rows
from mesh.client import MeshClient
from mesh.core.access import OPERATOR
from mesh.v1 import tasks_pb2 as pb


async def run_to_end(client: MeshClient, task_id: str, model: str) -> None:
    await client.submit(sleep_spec(task_id, seconds=0.1, steps=1, model=model))

    async def ended() -> bool:
        return (await client.get(task_id)).state == pb.TASK_STATE_SUCCEEDED

    await eventually(ended, what=f"{task_id} to succeed")


async def test_a_model_past_the_gpu_memory_evicts_the_one_not_in_use(cluster: Cluster) -> None:
    # One 80 GB GPU, models of 50 GB: room for one at a time.
    agent = cluster.start("m1", default_model_memory_mb=50_000, model_load_s=0.05)
    async with agent.client() as client:
        await run_to_end(client, "first", "x")
        await run_to_end(client, "second", "y")
        wait_log(agent, "evicting model x for y")

        async def only_y() -> bool:
            return [list(a.models_loaded) for a in await client.agents()] == [["y"]]

        await eventually(only_y, what="the agent to say it holds y alone")


async def test_an_agent_that_joins_warms_the_hot_model_the_plan_gives_it(
    cluster: Cluster,
) -> None:
    flags = {"plan_interval_s": 0.3, "model_load_s": 0.05}
    agents = [cluster.start("pa", **flags)]
    async with agents[0].client() as client:
        for i in range(4):  # pa alone: it loads hot and is asked for it
            await run_to_end(client, f"hot-{i}", "hot")
        agents.append(cluster.start("pb", **flags))  # joins idle: the plan moves hot to it too
        await until_peers(agents[0], ["pa", "pb"])

        async def both_hold_it() -> dict[str, object] | None:
            rows = {row["model"]: row for row in model_rows(await client.agents())}
            row = rows.get("hot")
            both = ["pa", "pb"]
            return row if row and row["loaded"] == row["planned"] == both else None

        row = await eventually(both_hold_it, what="the plan to put hot on both, and it warmed")
        assert row["warm"] == row["evictable"] == [] and row["demand"] > 0
    assert "warmed model hot" in agents[1].log()  # it ran no task: it warmed the model
    token = cluster.trust.token(USER, ["research"], [OPERATOR])
    shown = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.cli", "--ca", str(cluster.trust.ca), "--token", token,
        "models", "-e", agents[1].address, "-o", "json", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(shown.communicate(), 60)  # a hang guard
    assert [r["model"] for r in json.loads(out)] == ["hot"]
