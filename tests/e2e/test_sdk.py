"""The public SDK against real agents: results wherever they are stored, a Submit that
rides through an agent's death without making a second task, a watch that resumes on
another agent with no event lost or repeated, a drain that costs a client nothing, and
the gRPC service config other languages use."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncGenerator, Callable

import grpc
import pytest
from support import (
    ROOT,
    Cluster,
    apply_topology,
    eventually,
    sleep_spec,
    two_dcs,
    until_peers,
    wait_log,
)

from mesh.agent.api import until_set
from mesh.channels import channel_options
from mesh.core.task import TERMINAL, state_name
from mesh.errors import Unavailable
from mesh.local.etcdserver import EtcdMember
from mesh.sdk import AsyncClient, Client, TaskFailed
from mesh.sdk.errors import NotFound
from mesh.trust.pki import agent_host
from mesh.v1 import tasks_pb2 as pb
from mesh.v1 import tasks_pb2_grpc

SERVICE_CONFIG = ROOT / "docs" / "service-config.json"


async def test_submit_watch_and_result_inline_or_stored_elsewhere(cluster: Cluster) -> None:
    front = cluster.start("front", models='["other"]')  # never runs these: worker does
    cluster.start("worker", inline_result_bytes=1024)
    await until_peers(front, ["front", "worker"])
    async with AsyncClient([front.address], cluster.security, discover=False) as mesh:
        small = await mesh.submit("echo", "m", payload=b"hello")
        assert await small.result(timeout=30) == b"hello"
        again = await small.rerun()
        assert again.task_id != small.task_id and again.last.spec.rerun_of == small.task_id
        assert await again.result(timeout=30) == b"hello"
        big = await mesh.submit("echo", "m", payload=b"z" * 200_000)  # stored on worker
        assert await big.result(timeout=30) == b"z" * 200_000
        assert (await big.status()).agent == "worker"
        failing = await mesh.submit("sleep", "m", params={"seconds": "x"})
        with pytest.raises(TaskFailed) as failed:
            await failing.result(timeout=30)
        assert failed.value.status.error.code == "INVALID_ARGUMENT"
        with pytest.raises(NotFound):
            await mesh.task("no-such-task").status()


async def test_a_task_that_ran_in_another_dc_is_watched_and_fetched_from_home(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    etcds, start = two_dcs(cluster, more_etcd)
    west = start("west", models='["other"]')  # never runs these: east does
    east = start("east", inline_result_bytes=1024)
    seeds = {"west": west.peer_address, "east": east.peer_address}
    await apply_topology(cluster, prefix, etcds, seeds, overflow={"west": "east"})
    wait_log(west, "topology version 1 applied")
    async with west.client() as client:

        async def routes_east() -> bool:
            route = await client.route(sleep_spec("probe", seconds=0, steps=1, model="m"))
            return route.targets[0].name == "east"

        await eventually(routes_east, what="west to route m to east")
    async with AsyncClient([west.address], cluster.security) as mesh:
        task = await mesh.submit("echo", "m", payload=b"y" * 100_000)  # stored on east
        states = [state_name(e.status.state) async for e in task.watch()]
        assert states[-1] == "SUCCEEDED" and task.last is not None and task.last.dc == "east"
        assert await task.result(timeout=30) == b"y" * 100_000


async def test_a_submit_rides_through_a_dead_agent_and_makes_one_task(cluster: Cluster) -> None:
    dead = cluster.start("dead")
    alive = cluster.start("alive")
    await until_peers(alive, ["alive", "dead"])
    dead.signal(signal.SIGKILL)
    dead.wait()
    endpoints = [dead.address, alive.address]  # the dead one is tried first
    async with AsyncClient(endpoints, cluster.security, discover=False) as mesh:
        task = await mesh.submit("sleep", "m", task_id="once", params={"seconds": "0"})
        again = await mesh.submit("sleep", "m", task_id="once", params={"seconds": "0"})
        assert again.last is not None and again.last.task_id == "once"
        await task.wait(timeout=30)
        mine = [s.task_id async for s in mesh.list()]
    assert mine.count("once") == 1


async def test_a_watch_resumes_on_another_agent_with_no_event_lost_or_repeated(
    cluster: Cluster,
) -> None:
    front = cluster.start("front", models='["other"]')
    worker = cluster.start("worker")
    await until_peers(front, ["front", "worker"])
    endpoints = [front.address, worker.address]  # the watch starts on front
    async with AsyncClient(endpoints, cluster.security, discover=False) as mesh:
        task = await mesh.submit("sleep", "m", params={"seconds": "3", "steps": "6"})
        tokens, steps = [], []
        async for event in task.watch():
            tokens.append(event.resume_token)
            steps.append((state_name(event.status.state), event.status.progress.step))
            if len(tokens) == 2:
                front.signal(signal.SIGKILL)  # its stream breaks mid-task
    revisions = [int(t.split(":")[1]) for t in tokens]
    assert revisions == sorted(set(revisions)), "an event was repeated or out of order"
    assert steps[-1] == ("SUCCEEDED", 6)
    progress = [step for state, step in steps if state == "RUNNING"]
    assert progress == sorted(set(progress)), "a progress step was repeated"


async def test_a_graceful_drain_costs_a_client_no_error(cluster: Cluster) -> None:
    leaving = cluster.start("leaving", drain_notice_s=1)
    staying = cluster.start("staying")
    await until_peers(staying, ["leaving", "staying"])
    errors: list[BaseException] = []
    async with AsyncClient([leaving.address, staying.address], cluster.security) as mesh:

        async def submit_many() -> list[str]:
            ids = []
            for i in range(60):
                try:
                    ids.append((await mesh.submit("echo", "m", payload=b"%d" % i)).task_id)
                except Exception as exc:  # a client-visible error: the test fails on it
                    errors.append(exc)
            return ids

        submitting = asyncio.create_task(submit_many())
        await asyncio.sleep(0)
        leaving.signal(signal.SIGTERM)
        ids = await submitting
        assert leaving.wait() == 0
        ended = [await mesh.task(i).wait(timeout=30) for i in ids]
    assert errors == []
    assert len(ids) == 60 and all(s.state in TERMINAL for s in ended)


async def test_a_watch_on_a_draining_agent_ends_with_its_task_elsewhere(cluster: Cluster) -> None:
    leaving = cluster.start("leaving", models='["other"]', drain_notice_s=0.3)
    worker = cluster.start("worker")
    await until_peers(worker, ["leaving", "worker"])
    endpoints = [leaving.address, worker.address]  # the watch starts on the leaving one
    async with AsyncClient(endpoints, cluster.security, discover=False) as mesh:
        task = await mesh.submit("sleep", "m", params={"seconds": "3", "steps": "6"})
        states = []
        async for event in task.watch():
            states.append(state_name(event.status.state))
            if len(states) == 2:
                leaving.signal(signal.SIGTERM)  # it lets go of etcd mid-watch
        assert leaving.wait() == 0
    assert states[-1] == "SUCCEEDED"


async def test_a_stream_ends_unavailable_once_its_agent_lets_go_of_etcd() -> None:
    """Whether it was open or arrives as the agent leaves, and whatever the read under
    it would have raised: the client resumes from UNAVAILABLE, not from a broken read."""
    leaving = asyncio.Event()
    etcd_gone = asyncio.Event()

    async def follow() -> AsyncGenerator[int]:
        yield 1
        await etcd_gone.wait()
        raise RuntimeError("Channel is closed")

    seen = []
    with pytest.raises(Unavailable):
        async for item in until_set(follow(), leaving):
            seen.append(item)
            leaving.set()
            etcd_gone.set()
    assert seen == [1]
    with pytest.raises(Unavailable):  # a watch that arrives once the agent left
        async for item in until_set(follow(), leaving):
            seen.append(item)
    assert seen == [1]
    # A client that goes away mid-read: the read under way ends first, then the stream
    # (closing a generator that is still being read would raise instead).
    closed = asyncio.Event()

    async def slow() -> AsyncGenerator[int]:
        try:
            yield 1
            await asyncio.Event().wait()
            yield 2
        finally:
            closed.set()

    got: list[int] = []

    async def consume() -> None:
        async for item in until_set(slow(), asyncio.Event()):
            got.append(item)

    reading = asyncio.create_task(consume())
    await eventually(lambda: got == [1])  # it now waits in the read of the next one
    reading.cancel()
    results = await asyncio.gather(reading, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and closed.is_set()


def test_the_sync_client_reads_like_the_async_one(cluster: Cluster) -> None:
    agent = cluster.start("solo")
    with Client([agent.address], cluster.security) as mesh:
        task = mesh.submit("echo", "m", payload=b"sync")
        states = [state_name(e.status.state) for e in task.watch()]
        assert states[-1] == "SUCCEEDED"
        assert task.result(timeout=30) == b"sync"
        assert task.rerun("sync-again").result(timeout=30) == b"sync"
        assert [a.agent_id for a in mesh.agents()] == ["solo"]
        assert task.task_id in [s.task_id for s in mesh.list()]


async def test_the_service_config_balances_checks_health_and_retries(cluster: Cluster) -> None:
    """What the README gives other languages, through Python's own gRPC: round robin
    over the DC's agents with health checking, retrying UNAVAILABLE for safe calls."""
    config = json.loads(SERVICE_CONFIG.read_text())  # before any loop work: a small file
    agents = [cluster.start(name) for name in ("a", "b", "c")]
    await until_peers(agents[0], ["a", "b", "c"])
    async with agents[0].client() as one:
        await one.submit(sleep_spec("probe", seconds=0, steps=1, model="m"))
    target = "ipv4:" + ",".join(a.address for a in agents)
    options = [
        *channel_options(8 * 1024 * 1024),
        ("grpc.service_config", json.dumps(config)),
        ("grpc.ssl_target_name_override", agent_host(cluster.trust.mesh)),
    ]
    credentials = cluster.security.credentials()
    async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
        get = tasks_pb2_grpc.TaskServiceStub(channel).Get
        assert (await get(pb.GetRequest(task_id="probe"), timeout=10)).task_id == "probe"
        agents[1].signal(signal.SIGKILL)
        agents[2].signal(signal.SIGTERM)  # NOT_SERVING: health checking drops it
        for _ in range(30):
            reply = await get(pb.GetRequest(task_id="probe"), timeout=10)
            assert reply.task_id == "probe"
