"""Online work takes back the GPUs batch borrowed, on a real agent: a batch flood holds
both GPUs, an online task arrives, one batch run is preempted (its record counts it, and it
runs again as its next attempt), the online task runs, and batch's own share is kept;
``meshctl quota show`` counts the preemption and the GPU the rerun borrows."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aetcd
import yaml
from support import Cluster, cli_operator, eventually, sleep_spec, until_peers

from mesh.agent.decisionlog import replay
from mesh.local.etcdserver import EtcdMember
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.quota import apply_policy
from mesh.v1 import tasks_pb2 as pb

RUNNING, SUCCEEDED = pb.TASK_STATE_RUNNING, pb.TASK_STATE_SUCCEEDED


async def test_an_online_task_preempts_a_borrowed_batch_run(
    cluster: Cluster, etcd_client: aetcd.Client, etcd: EtcdMember, prefix: str, tmp_path: Path
) -> None:
    # Of 2 GPUs one is batch's own, one online's; the group's cap makes its runs hold slots.
    policy = {"online_share": 0.5, "groups": {"research": {"max_gpus": 4}}}
    await apply_policy(EtcdKv(etcd_client), KeySpace(prefix, "west"), yaml.safe_dump(policy))
    decisions = tmp_path / "decisions.jsonl"
    agent = cluster.start("p1", fake_gpus="2xA100-80GB", preempt_after_s=0, decision_log=decisions)
    await until_peers(agent, ["p1"])
    async with agent.client() as client:
        for name in ("batch-1", "batch-2"):
            await client.submit(sleep_spec(name, seconds=120, steps=120, model="m"))

        async def both_run() -> bool:
            states = [(await client.get(t)).state for t in ("batch-1", "batch-2")]
            return states == [RUNNING, RUNNING]

        await eventually(both_run, what="the batch flood to hold both GPUs")
        online = sleep_spec("online-1", seconds=0.2, steps=1, model="m")
        online.task_type = pb.TASK_TYPE_LLM  # online by its type
        await client.submit(online)

        async def online_done() -> bool:
            return (await client.get("online-1")).state == SUCCEEDED

        await eventually(online_done, what="the online task to run and end")
        batch = {t: await client.get(t) for t in ("batch-1", "batch-2")}
        preempted = [s for s in batch.values() if s.preemptions == 1]
        kept = [s for s in batch.values() if s.preemptions == 0]
        assert len(preempted) == 1 and len(kept) == 1, batch
        assert kept[0].state == RUNNING and kept[0].attempt == 1  # batch's own share
        assert preempted[0].attempt == 2  # given back, to run again

        async def back() -> bool:
            return (await client.get(preempted[0].task_id)).state == RUNNING

        await eventually(back, what="the preempted batch task to run again")
        topology = tmp_path / "topology.yaml"
        topology.write_text(f"prefix: {prefix}\ndcs: {{west: {{etcd: ['{etcd.endpoint}']}}}}\n")
        shown = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", *cli_operator(cluster.trust), "quota", "show",
            "--topology", str(topology), "-o", "json", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(shown.communicate(), 60)  # a hang guard
        assert json.loads(out) == [
            {"dc": "west", "who": "group research", "held": 2, "borrowed": 1, "limit": 4,
             "preempted": 1}
        ]  # fmt: skip
        for name in ("batch-1", "batch-2"):
            await client.cancel(name, "test over")
    # The preemption is in the decision log, and the pure core decides it again the same.
    logged = [r for r in replay(decisions) if r.task_id == "online-1"]
    assert logged and all(r.same for r in logged)  # its routing and its preemption
    assert [r.now for r in logged if "victims" in r.now] == [{"victims": [preempted[0].task_id]}]


async def test_an_online_task_reclaims_gpus_when_every_queue_is_full(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    """Batch holds both GPUs and fills the queue: the online task is taken past the
    queue's bound by the agent whose batch runs borrowed its GPUs, not backlogged behind
    batch work that would hold them for minutes."""
    policy = yaml.safe_dump({"online_share": 0.5})
    await apply_policy(EtcdKv(etcd_client), KeySpace(prefix, "west"), policy)
    agent = cluster.start("r1", fake_gpus="2xA100-80GB", preempt_after_s=0, max_queue_length=1)
    await until_peers(agent, ["r1"])
    async with agent.client() as client:
        batch = [f"flood-{i}" for i in range(3)]  # two run, one fills the queue
        for name in batch:
            await client.submit(sleep_spec(name, seconds=120, steps=120, model="m"))

        async def full() -> bool:
            states = [(await client.get(t)).state for t in batch]
            return states.count(RUNNING) == 2 and states.count(pb.TASK_STATE_QUEUED) == 1

        await eventually(full, what="batch to hold both GPUs and the queue")
        online = sleep_spec("urgent", seconds=0.2, steps=1, model="m")
        online.task_type = pb.TASK_TYPE_LLM
        reply = await client.submit(online)
        assert reply.status.agent == "r1"  # taken past the bound, not backlogged

        async def online_done() -> bool:
            return (await client.get("urgent")).state == SUCCEEDED

        await eventually(online_done, what="the online task to run by reclaiming a GPU")
        for name in batch:
            await client.cancel(name, "test over")
