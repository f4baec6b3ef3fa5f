"""A Submit while its DC's etcd refuses writes, with real agents and a real etcd stopped
and started again: the task goes to the overflow DC only when etcd stays down, and an
earlier write of the same id that etcd applied after all is the answer, not a second task
in another DC (the chaos suite's etcd leader kill found the double)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from support import AgentProc, Cluster, apply_topology, sleep_spec, two_dcs, wait_log

from mesh.errors import TaskNotFound
from mesh.local.etcdserver import EtcdMember
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.records import TaskStore
from mesh.v1 import tasks_pb2 as pb


async def west_and_east(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str, retry_s: float
) -> tuple[dict[str, EtcdMember], AgentProc]:
    etcds, start = two_dcs(cluster, more_etcd)
    west = start("west", etcd_refused_retry_s=retry_s)
    east = start("east")
    seeds = {"west": west.peer_address, "east": east.peer_address}
    await apply_topology(cluster, prefix, etcds, seeds, overflow={"west": "east"})
    wait_log(west, "topology version 1 applied")
    return etcds, west


def task(task_id: str) -> pb.TaskSpec:
    return sleep_spec(task_id, seconds=0, steps=1, model="m", queue="normal", gpu_count=1)


async def test_a_submit_goes_to_the_overflow_dc_when_etcd_stays_down(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    etcds, west = await west_and_east(cluster, more_etcd, prefix, retry_s=0)
    etcds["west"].stop()
    async with west.client() as client:
        reply = await client.submit(task("away"), timeout_s=30)
    assert reply.status.dc == "east"
    assert "etcd refused the record of away" in west.log()


async def test_a_retried_submit_is_answered_by_the_record_etcd_holds_once_back(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    """The first Submit's write was applied (here: answered; in the chaos run: timed out
    and applied after the leader died); its retry meets an etcd that refuses writes."""
    etcds, west = await west_and_east(cluster, more_etcd, prefix, retry_s=30)
    spec = task("late")
    async with west.client() as client:
        first = await client.submit(spec)
        etcds["west"].stop()
        retry = asyncio.create_task(client.submit(spec, timeout_s=60))
        await asyncio.to_thread(wait_log, west, "etcd refused the record of late")
        etcds["west"].start()
        reply = await retry
    assert (first.status.dc, reply.status.dc, reply.existing) == ("west", "west", True)
    async with client_for([etcds["east"].endpoint], security=cluster.trust.operator()) as raw:
        with pytest.raises(TaskNotFound):  # east never took it: no second task
            await TaskStore(EtcdKv(raw), KeySpace(prefix, "east")).get("late")
