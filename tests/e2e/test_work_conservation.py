"""Work conservation with real agents and real etcd: tasks queued on one agent go to the
idle agents of its DC, and a waiting task's expected start is kept true."""

from __future__ import annotations

from collections import Counter

from support import Cluster, eventually, sleep_spec, until_peers

from mesh.client import MeshClient
from mesh.v1 import tasks_pb2 as pb


async def states(client: MeshClient, ids: list[str]) -> list[pb.TaskStatus]:
    return [await client.get(task_id) for task_id in ids]


async def test_tasks_queued_on_a_busy_agent_move_to_agents_that_join_idle(
    cluster: Cluster,
) -> None:
    """Five long tasks on an agent of two GPUs: two run, three wait. Two agents join
    its DC with three idle GPUs between them: the three waiting tasks move there and run,
    rather than wait for the first runs to end (five minutes)."""
    a = cluster.start("a", fake_gpus="2xA100-80GB")
    ids = [f"long-{i}" for i in range(5)]
    async with a.client() as client:
        for task_id in ids:
            await client.submit(sleep_spec(task_id, seconds=300, steps=2, model="sdxl"))
        queued = await states(client, ids)
        assert Counter(s.state for s in queued) == {
            pb.TASK_STATE_RUNNING: 2,
            pb.TASK_STATE_QUEUED: 3,
        }
        cluster.start("b", fake_gpus="2xA100-80GB")
        cluster.start("c")
        await until_peers(a, ["a", "b", "c"])

        async def all_running() -> list[pb.TaskStatus] | None:
            found = await states(client, ids)
            return found if all(s.state == pb.TASK_STATE_RUNNING for s in found) else None

        running = await eventually(all_running, timeout_s=30, what="every task running")
    assert Counter(s.agent for s in running) == {"a": 2, "b": 2, "c": 1}
    assert all(s.attempt == 1 for s in running)  # moved, not re-queued: one attempt each


async def test_an_expected_start_run_out_is_written_again(cluster: Cluster) -> None:
    """A run longer than expected (the model's 3 s load is not in the sleep pipeline's
    estimate) leaves the task behind it waiting past the start its record gave: the
    record's expected start moves on, so it is never left in the past."""
    a = cluster.start("a", model_load_s=3)
    async with a.client() as client:
        await client.submit(sleep_spec("first", seconds=0.5, steps=1, model="cold"))
        await client.submit(sleep_spec("second", seconds=0.5, steps=1, model="cold"))
        waiting = await client.get("second")
        assert waiting.state == pb.TASK_STATE_QUEUED and waiting.HasField("expected_start")
        given = waiting.expected_start.ToMilliseconds()

        async def revised() -> pb.TaskStatus | None:
            status = await client.get("second")
            moved_on = status.expected_start.ToMilliseconds() > given + 500
            return status if moved_on and status.state == pb.TASK_STATE_QUEUED else None

        await eventually(revised, what="the expected start written again")
