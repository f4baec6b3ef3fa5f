"""Caps that hold with no scheduler, on real agents and a real etcd: a user capped at 2
GPUs who submits 10 tasks never has more than 2 running, on whichever agents, and every
task still runs (it waits, it never fails for its cap)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable

import aetcd
import grpc
import pytest
import yaml
from support import USER, Cluster, apply_topology, eventually, sleep_spec, two_dcs, wait_log

from mesh.core.access import GROUP_ADMIN
from mesh.core.task import TERMINAL
from mesh.local.etcdserver import EtcdMember
from mesh.store.etcd import client_for, watch_events
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.quota import apply_policy
from mesh.store.reads import decode
from mesh.v1 import tasks_pb2 as pb

POLICY = {"groups": {"research": {"max_gpus": 3, "users": {USER: {"max_gpus": 2}}}}}


async def test_a_user_capped_at_two_never_runs_more_than_two(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    keys = KeySpace(prefix, "west")
    await apply_policy(EtcdKv(etcd_client), keys, yaml.safe_dump(POLICY))  # before any agent starts
    revision = (await etcd_client.get_prefix(keys.tasks)).header.revision
    running: set[str] = set()
    most = 0
    ended: set[str] = set()

    async def follow() -> None:
        nonlocal most
        async for event in watch_events(
            etcd_client, keys.tasks, prefix=True, start_revision=revision + 1
        ):
            if not event.kv.value:
                continue
            status = decode(event.kv.value).status
            if status.state == pb.TASK_STATE_RUNNING:
                running.add(status.task_id)
            else:
                running.discard(status.task_id)
            if status.state in TERMINAL:
                ended.add(status.task_id)
            most = max(most, len(running))

    watching = asyncio.create_task(follow())
    agents = [cluster.start(name, fake_gpus="2xA100-80GB") for name in ("q1", "q2")]
    try:
        async with agents[0].client() as client:
            ids = [f"capped-{i}" for i in range(10)]
            for i, task_id in enumerate(ids):
                await client.submit(sleep_spec(task_id, seconds=0.4, steps=2, model=f"m{i % 3}"))

            async def told_why() -> bool:
                statuses = [await client.get(t) for t in ids]
                return any(
                    s.progress.message.startswith("waiting for quota: user") for s in statuses
                )

            await eventually(told_why, what="a waiting task to say why")

            async def route_says_so() -> bool:  # meshctl route shows it too
                probe = sleep_spec("probe", seconds=0, steps=1, model="m0")
                return (await client.route(probe)).quota.startswith("waiting for quota: user")

            await eventually(route_says_so, what="route to say the user is at the cap")
            await eventually(lambda: len(ended) == len(ids), timeout_s=60, what="every task to end")
            states = {t: (await client.get(t)).state for t in ids}
        assert set(states.values()) == {pb.TASK_STATE_SUCCEEDED}, states
        assert most == 2  # the cap was reached, and never passed (4 GPUs were free)
        slots = await etcd_client.get_prefix(keys.quota + b"slots/")
        assert list(slots) == []  # every slot given back at the end
    finally:
        watching.cancel()


async def run(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)  # a hang guard
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_group_admin_splits_its_groups_cap_and_never_beyond_it(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    keys = KeySpace(prefix, "west")
    await apply_policy(EtcdKv(etcd_client), keys, yaml.safe_dump(POLICY))
    agent = cluster.start("s1")
    admin = cluster.trust.user("carol", groups=["research"], roles=[GROUP_ADMIN])
    async with agent.client(admin) as client:
        split = await client.split_quota("research", {"eve": 1}, [])
        assert (split.dc, split.max_gpus, dict(split.users)) == ("west", 3, {USER: 2, "eve": 1})
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.split_quota("research", {"eve": 2}, [])
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "add up to 4 GPUs, more than the group's 3" in (refused.value.details() or "")
        split = await client.split_quota("research", {"eve": 2}, [USER])  # room made first
        assert dict(split.users) == {"eve": 2}
    stored = yaml.safe_load((await etcd_client.get(keys.quota + b"policy")).value)
    assert stored["groups"]["research"]["users"] == {"eve": {"max_gpus": 2}}
    token = cluster.trust.token("carol", ["research"], [GROUP_ADMIN])
    meshctl = [sys.executable, "-m", "mesh.cli", "--ca", str(cluster.trust.ca), "--token", token]
    where = ["-e", agent.address, "-o", "json"]
    code, out, err = await run(*meshctl, "quota", "split", "research", "--user", "bob=1", *where)
    assert code == 0, err
    assert json.loads(out)["users"] == {"eve": 2, "bob": 1}
    code, out, err = await run(*meshctl, "quota", "split", "research", "--user", "bob=2", *where)
    assert code != 0 and "more than the group's 3" in out + err
    for who in (
        cluster.trust.user("dave", groups=["vision"], roles=[GROUP_ADMIN]),  # another group's
        cluster.trust.user("erin", groups=["research"]),  # a member, not its admin
    ):
        async with agent.client(who) as client:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await client.split_quota("research", {"erin": 3}, [])
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_spent_budget_holds_the_next_task_until_the_operator_raises_it(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    keys = KeySpace(prefix, "west")
    month = 31 * 86_400  # the longest period: a renewal mid-test is as unlikely as can be

    def budget(gpu_seconds: float) -> str:
        spend = {"gpu_seconds": gpu_seconds, "period_s": month}
        return yaml.safe_dump({"groups": {"research": {"budget": spend}}})

    await apply_policy(EtcdKv(etcd_client), keys, budget(0.5))
    agent = cluster.start("b1", fake_gpus="1xA100-80GB")
    async with agent.client() as client:

        async def state(task_id: str) -> pb.TaskStatus:
            return await client.get(task_id)

        await client.submit(sleep_spec("spend-1", seconds=0.6, steps=1, model="m"))
        await eventually(
            lambda: _ended(state, "spend-1"), what="the first task to spend the budget"
        )
        usage = [float(kv.value) for kv in await etcd_client.get_prefix(keys.quota + b"usage/")]
        assert len(usage) == 1 and usage[0] >= 0.6  # this agent's GPU-seconds, this period
        await client.submit(sleep_spec("spend-2", seconds=0, steps=1, model="m"))

        async def told_why() -> bool:
            message = (await state("spend-2")).progress.message
            spent = "waiting for budget: group research spent "  # what the run took, of 0.5
            return message.startswith(spent) and "/0.5 GPU-seconds this period" in message

        await eventually(told_why, what="the second task to wait for the budget, saying so")
        await apply_policy(EtcdKv(etcd_client), keys, budget(1000))
        await eventually(lambda: _ended(state, "spend-2"), what="the second task to run")


async def _ended(state, task_id: str) -> bool:
    return (await state(task_id)).state == pb.TASK_STATE_SUCCEEDED


async def test_a_global_cap_holds_a_dc_to_its_part(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    """Two DCs, a group capped at 2 GPUs across both: west, whose 2 GPUs are half the
    slots it counts (east, never heard from, counts as alike), runs 1 at a time."""
    etcds, start = two_dcs(cluster, more_etcd)
    policy = yaml.safe_dump({"groups": {"research": {"max_gpus_global": 2}}})
    async with client_for([etcds["west"].endpoint], security=cluster.trust.operator()) as raw:
        await apply_policy(EtcdKv(raw), KeySpace(prefix, "west"), policy)
    west = start("west", fake_gpus="2xA100-80GB")
    await apply_topology(cluster, prefix, etcds, {"west": west.peer_address})
    wait_log(west, "topology version 1 applied")
    async with west.client() as client:
        ids = [f"global-{i}" for i in range(3)]
        for task_id in ids:
            await client.submit(sleep_spec(task_id, seconds=0.5, steps=1, model="m"))

        async def told_why() -> bool:
            messages = [(await client.get(t)).progress.message for t in ids]
            return "waiting for quota: global research at 1/1 GPUs" in messages

        await eventually(told_why, what="a task to wait for the group's part of the cap")
        for task_id in ids:
            await eventually(lambda t=task_id: _ended(client.get, t), what=f"{task_id} to run")
