"""A model no one agent's GPU memory holds runs split by layers over real agents: each
stage a block of layers on its own agent, in order, each with the previous stage's
output; when a stage's agent dies, the layers not yet run go to the agents left."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest
from support import (
    AgentProc,
    Cluster,
    eventually,
    peer_channel,
    sleep_spec,
    until_peers,
    wait_log,
)

from mesh.client import MeshClient
from mesh.v1 import peer_pb2, peer_pb2_grpc
from mesh.v1 import tasks_pb2 as pb

# Agents of one 48 GB GPU; a model of 100 GB in 8 layers of 12.5 GB: three layers fit an
# agent, so no agent can run it alone and three must share it.
FLAGS = {"fake_gpus": "1xL40S-48GB", "model_memory_mb": json.dumps({"big": 100_000})}


def big_task(task_id: str, seconds: float) -> pb.TaskSpec:
    spec = sleep_spec(task_id, seconds=seconds, steps=1, model="big")
    spec.params["layers"] = "8"
    return spec


async def ended(client: MeshClient, task_id: str) -> pb.TaskStatus:
    async def done() -> pb.TaskStatus | None:
        status = await client.get(task_id)
        return status if status.state >= pb.TASK_STATE_SUCCEEDED else None

    return await eventually(done, what=f"{task_id} to end", timeout_s=60)


def stages_of(status: pb.TaskStatus) -> list[dict]:
    assert status.state == pb.TASK_STATE_SUCCEEDED, status.error_message
    result = json.loads(status.result.inline)
    assert result["layers_run"] == 8
    layer = 0
    for stage in result["stages"]:  # contiguous, in order, every layer once
        assert stage["first"] == layer and stage["count"] > 0
        layer += stage["count"]
    assert layer == 8
    return result["stages"]


def start(cluster: Cluster, count: int) -> list[AgentProc]:
    return [cluster.start(f"s{i}", **FLAGS) for i in range(count)]


async def test_a_model_too_big_for_any_agent_runs_split_by_layers(cluster: Cluster) -> None:
    agents = start(cluster, 3)
    await until_peers(agents[0], [a.agent_id for a in agents])
    async with agents[0].client() as client:
        await client.submit(big_task("big-1", 0.8))
        status = await ended(client, "big-1")
        stages = stages_of(status)
        assert sorted(s["agent"] for s in stages) == ["s0", "s1", "s2"]  # 3+3+2 layers
        assert all(s["cold"] for s in stages)  # each loaded its own layers
        await client.submit(big_task("big-2", 0.8))
        again = stages_of(await ended(client, "big-2"))
        assert not any(s["cold"] for s in again)  # and holds them for the next task
    driver = next(a for a in agents if a.agent_id == status.agent)
    wait_log(driver, "split big-1 by layers")


async def test_the_layers_left_go_to_other_agents_when_a_stage_agent_dies(
    cluster: Cluster,
) -> None:
    agents = start(cluster, 4)  # four: two layers each, and three can still hold it all
    await until_peers(agents[0], [a.agent_id for a in agents])
    async with agents[0].client() as client:
        await client.submit(big_task("split-1", 8.0))  # 1 s a layer
        driver_id = (await client.get("split-1")).agent
        driver = next(a for a in agents if a.agent_id == driver_id)
        wait_log(driver, "split split-1 by layers")
        line = next(
            json.loads(line)["msg"]
            for line in driver.log().splitlines()
            if "split split-1 by layers" in line
        )
        order = [part.split()[0] for part in line.split(": ", 1)[1].split(", ")]
        assert len(order) == 4
        victim_id = next(a for a in reversed(order) if a != driver_id)
        victim = next(a for a in agents if a.agent_id == victim_id)
        os.killpg(victim.process.pid, signal.SIGKILL)  # before its stage: 2 s a stage
        stages = stages_of(await ended(client, "split-1"))
    assert victim_id not in [s["agent"] for s in stages]
    wait_log(driver, f"stage {victim_id} of split-1")


async def test_a_stage_request_is_checked_and_only_an_agent_of_the_dc_may_send_one(
    cluster: Cluster,
) -> None:
    agent = start(cluster, 1)[0]
    async with agent.client() as client:  # a spec as its entry agent admitted it
        await client.submit(sleep_spec("probe", seconds=0.1, steps=1, model="small"))
        spec = (await ended(client, "probe")).spec  # 8 layers: the pipeline's default
    tampered = pb.TaskSpec()
    tampered.CopyFrom(spec)
    tampered.pipeline = "nope"  # not as its entry agent admitted it
    huge = b"x" * (2 << 20)  # past a stage's input bound
    refused = [
        peer_pb2.StageRequest(spec=spec, attempt=1, first=0, count=0),
        peer_pb2.StageRequest(spec=spec, attempt=1, first=6, count=3),  # past layer 7
        peer_pb2.StageRequest(spec=spec, attempt=0, first=0, count=1),
        peer_pb2.StageRequest(spec=spec, attempt=1, first=0, count=1, input=huge),
        peer_pb2.StageRequest(spec=spec, attempt=1, first=3, count=1, input=b"{}"),
        peer_pb2.StageRequest(spec=tampered, attempt=1, first=0, count=1),
    ]
    stage = peer_pb2.StageRequest(spec=spec, attempt=1, first=0, count=3)
    async with peer_channel(agent.peer_address, cluster.as_agent("s9", "west")) as channel:
        stub = peer_pb2_grpc.PeerServiceStub(channel)
        for request in refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.RunStage(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RunStage(stage)  # no deadline: it could hold a GPU for ever
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fine = await stub.RunStage(stage, timeout=10)
        assert json.loads(fine.output) == {"layers_run": 3} and fine.cold
    async with peer_channel(agent.peer_address, cluster.as_agent("e9", "east")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await peer_pb2_grpc.PeerServiceStub(channel).RunStage(stage, timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
