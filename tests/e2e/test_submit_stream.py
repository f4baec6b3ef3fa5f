"""Many Submits over one stream, on real agents over real TLS: each task answered as a
Submit is (refused alone, idempotent by id), followed to its end on the same stream, the
stream held to the caller's role, and the SDK's ``submit_many`` riding through the death
of the agent its stream was on."""

from __future__ import annotations

import signal

import grpc
import pytest
from support import Cluster, sleep_spec, until_peers

from mesh.core.access import READER
from mesh.sdk import AsyncClient
from mesh.sdk.errors import InvalidArgument
from mesh.v1 import tasks_pb2 as pb


def echo(task_id: str) -> pb.TaskSpec:
    return pb.TaskSpec(task_id=task_id, pipeline="echo", model="m", payload=task_id.encode())


async def test_each_task_is_answered_alone_and_followed_to_its_end(cluster: Cluster) -> None:
    agent = cluster.start("s1")
    await until_peers(agent, ["s1"])
    requests = [
        pb.SubmitStreamRequest(spec=echo(f"st-{i}"), ref=f"r{i}", follow=True) for i in range(20)
    ]
    bad = pb.TaskSpec(task_id="st-bad", pipeline="no-such-pipeline", model="m")
    requests.append(pb.SubmitStreamRequest(spec=bad, ref="bad", follow=True))
    requests.append(pb.SubmitStreamRequest(spec=echo("st-0"), ref="again"))  # the same id
    async with agent.client() as client:
        answers = [a async for a in client.submit_stream(requests)]
        status = await client.get("st-7")
    by_ref: dict[str, list[pb.SubmitStreamResponse]] = {}
    for answer in answers:
        by_ref.setdefault(answer.ref, []).append(answer)
    for i in range(20):
        submitted, ended = by_ref[f"r{i}"]  # in that order, one each
        assert submitted.submitted.status.task_id == f"st-{i}"
        assert ended.ended.state == pb.TASK_STATE_SUCCEEDED
    (refused,) = by_ref["bad"]
    assert refused.error.code == "INVALID_ARGUMENT" and "pipeline" in refused.error.message
    (again,) = by_ref["again"]
    assert again.submitted.existing and again.submitted.status.task_id == "st-0"
    assert status.state == pb.TASK_STATE_SUCCEEDED and status.result.inline == b"st-7"


async def test_a_stream_is_held_to_the_callers_role(cluster: Cluster) -> None:
    agent = cluster.start("s2")
    await until_peers(agent, ["s2"])
    reader = cluster.trust.user("ro", roles=[READER])
    request = pb.SubmitStreamRequest(spec=echo("st-ro"), ref="r")
    async with agent.client(reader) as client:
        # The call's status, as the agent ended it: reading the stream instead may raise
        # the client's own failure to send the request the agent refused before reading
        # (INTERNAL, "execute_batch"), as CI saw once.
        call = client.submit_stream([request])
        assert await call.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    async with agent.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.get("st-ro")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was submitted


async def test_submit_many_rides_through_the_death_of_its_agent(cluster: Cluster) -> None:
    """The stream's agent is killed with tasks answered, under way and not yet sent:
    every task is answered once and ends once, none is submitted twice."""
    first = cluster.start("m1")
    second = cluster.start("m2")
    await until_peers(first, ["m1", "m2"])
    ids = [f"mn-{i:03d}" for i in range(60)]

    def specs():
        for n, task_id in enumerate(ids):
            if n == 20:  # by now some are answered, some under way
                first.process.send_signal(signal.SIGKILL)
            yield sleep_spec(task_id, seconds=0.2, steps=1, model="sdxl")
        yield pb.TaskSpec(task_id="mn-bad", pipeline="no-such-pipeline", model="sdxl")

    submitted, ended, refused = [], [], []
    # Without discovery the first stream goes to the first agent: the one killed.
    seeds = [first.address, second.address]
    async with AsyncClient(seeds, cluster.security, discover=False) as mesh:
        async for answer in mesh.submit_many(specs(), follow=True):
            if answer.error is not None:
                refused.append((answer.task_id, answer.error))
            elif answer.ended:
                ended.append(answer.status)
            else:
                submitted.append(answer.task_id)
        assert sorted(submitted) == ids and len(set(submitted)) == len(submitted)
        assert sorted(s.task_id for s in ended) == ids
        assert all(s.state == pb.TASK_STATE_SUCCEEDED for s in ended)  # re-run if need be
        ((bad_id, error),) = refused
        assert bad_id == "mn-bad" and isinstance(error, InvalidArgument)
