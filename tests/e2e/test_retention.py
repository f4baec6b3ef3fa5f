"""What a task leaves behind goes after ``task_retention_s``: its record and its claim
(etcd deletes them with their shared lease) and a result stored on the agent's disk."""

from __future__ import annotations

import grpc
from support import Cluster, eventually

from mesh.core.task import TERMINAL
from mesh.store.etcd import client_for
from mesh.store.keys import KeySpace
from mesh.v1 import tasks_pb2 as pb


async def test_a_finished_task_and_its_stored_result_are_gone_after_retention(
    cluster: Cluster, prefix: str
) -> None:
    agent = cluster.start(
        "keeper", task_retention_s=2, inline_result_bytes=16, default_deadline_s=2, max_deadline_s=2
    )
    spec = pb.TaskSpec(
        task_id="brief", user=pb.User(id="ada"), task_type=pb.TASK_TYPE_CUSTOM,
        pipeline="echo", model="m", payload=b"a result too big to keep inline",
    )  # fmt: skip
    results = cluster.workdir / "results"
    async with agent.client() as client:
        await client.submit(spec)

        async def ended() -> bool:
            return (await client.get("brief")).state in TERMINAL

        await eventually(ended, what="the task to end")
        assert any(results.iterdir()), "its result was stored on disk"

        async def gone() -> bool:
            try:
                await client.get("brief")
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False

        await eventually(gone, what="the record to expire")
    await eventually(lambda: not any(results.iterdir()), what="the stored result to go")
    # The claim is kept as long as a task may run (max_deadline_s) on top.
    async with client_for([cluster.etcd_endpoint], security=cluster.trust.operator()) as etcd:

        async def unclaimed() -> bool:
            return await etcd.get(KeySpace(prefix, "west").claim("brief")) is None

        await eventually(unclaimed, what="the claim to expire")
