"""The DC's durable backlog under saturation, with real agents: class weights, aging,
and a backlog that outlives every agent of the DC."""

from __future__ import annotations

import signal
from collections import Counter

from support import Cluster, eventually, sleep_spec, wait_log

from mesh.client import MeshClient
from mesh.core.task import TERMINAL, state_name
from mesh.v1 import tasks_pb2 as pb

USER = "ada"


def task(task_id: str, queue: str, seconds: float) -> pb.TaskSpec:
    return sleep_spec(
        task_id, seconds=seconds, steps=1, model="m", user=pb.User(id=USER), queue=queue
    )


async def all_done(client: MeshClient, count: int) -> list[pb.TaskStatus] | None:
    tasks = (await client.list(user_id=USER, limit=1000)).tasks
    done = [t for t in tasks if t.state in TERMINAL]
    return done if len(done) == count else None


def dispatch_order(statuses: list[pb.TaskStatus]) -> list[pb.TaskStatus]:
    """Tasks that waited in the backlog, in the order they started."""
    waited = [s for s in statuses if s.path and s.path[0] == "backlog"]
    return sorted(waited, key=lambda s: s.started_at.ToNanoseconds())


async def test_under_saturation_vip_gets_eight_dispatches_in_ten(cluster: Cluster) -> None:
    # No placement plan: a planned home may queue past the bound, in arrival order, and
    # this test measures the backlog's weighted order.
    solo = cluster.start("solo", max_queue_length=1, placement_plan="false")
    async with solo.client() as client:
        for i in range(2):  # fill the agent (its slot and its queue): all else waits
            await client.submit(task(f"block{i}", "normal", 300))
        for i in range(60):  # interleaved, so arrival order favours nobody
            await client.submit(task(f"v{i:02d}", "vip", 0.02))
            await client.submit(task(f"n{i:02d}", "normal", 0.02))
        for i in range(2):
            await client.cancel(f"block{i}", "let the backlog go")
        statuses = await eventually(
            lambda: all_done(client, 122), timeout_s=120, what="every task to end"
        )
    ran = [s for s in statuses if not s.task_id.startswith("block")]
    assert all(state_name(s.state) == "SUCCEEDED" for s in ran)
    first = dispatch_order(ran)[:50]
    assert len(first) == 50
    vip = Counter(s.spec.queue for s in first)["vip"]
    assert 36 <= vip <= 44, f"{vip} of the first 50 dispatches were vip"


async def test_aging_bounds_how_long_a_light_class_waits(cluster: Cluster) -> None:
    from mesh.store import topostore
    from mesh.topology import parse

    solo = cluster.start("solo", max_queue_length=1, queue_aging_s=1.0, placement_plan="false")
    topology = parse(
        {
            "prefix": cluster.prefix,
            "dcs": {"west": {"etcd": [cluster.etcd_endpoint]}},
            "queues": {"vip": 1000, "normal": 1},
        },
        "test",
    )
    assert all(
        r.startswith("applied")
        for r in (await topostore.apply(topology, cluster.trust.operator())).values()
    )
    wait_log(solo, "topology version 1 applied")
    async with solo.client() as client:
        for i in range(2):  # fill the agent: what follows goes to the backlog
            await client.submit(task(f"block{i}", "vip", 0.3))
        await client.submit(task("patient", "normal", 0.01))
        for i in range(40):
            await client.submit(task(f"v{i:02d}", "vip", 0.1))
        statuses = await eventually(
            lambda: all_done(client, 43), timeout_s=120, what="every task to run"
        )
    order = [s.task_id for s in dispatch_order(statuses)]
    # By weight alone it would go last, behind 40 vip tasks; aging lets it in after ~1 s.
    assert order.index("patient") < len(order) - 10, order


async def test_the_backlog_outlives_every_agent(cluster: Cluster) -> None:
    first = cluster.start("first", max_queue_length=1, lease_ttl_s=2)
    async with first.client() as client:
        for i in range(6):
            await client.submit(task(f"t{i}", "normal", 0.5))
        waiting = [t for t in (await client.list(user_id=USER)).tasks if not t.agent]
        assert len(waiting) == 4  # two on the agent, four in the backlog
    first.signal(signal.SIGKILL)
    first.wait()
    second = cluster.start("second", max_queue_length=1, lease_ttl_s=2)
    async with second.client() as client:
        statuses = await eventually(
            lambda: all_done(client, 6), timeout_s=60, what="the backlog to drain on the new agent"
        )
    assert all(state_name(s.state) == "SUCCEEDED" and s.agent == "second" for s in statuses)
    assert sorted(s.attempt for s in statuses) == [1, 1, 1, 1, 2, 2]
