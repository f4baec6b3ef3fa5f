"""The public API on real agents: run on a peer, watch and cancel from elsewhere,
idempotent resubmits, reruns, and a precise status for each kind of bad input."""

from __future__ import annotations

import json
import signal
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import AgentProc, Cluster, eventually, peer_channel, sleep_spec, until_peers

from mesh.channels import Security
from mesh.client import MeshClient
from mesh.core.task import TERMINAL, state_name
from mesh.local.localmesh import free_port
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

MiB = 1024 * 1024


def sleep_task(task_id: str, seconds: float = 0.3, steps: int = 3, **fields: object) -> pb.TaskSpec:
    user = pb.User(id="ada", group="research")
    return sleep_spec(task_id, seconds=seconds, steps=steps, model="sdxl", user=user, **fields)


async def follow(client: MeshClient, task_id: str) -> list[pb.TaskEvent]:
    events = []
    async for event in client.watch(task_id, timeout_s=60):
        events.append(event)
        if event.status.state in TERMINAL:
            break
    return events


async def until_state(client: MeshClient, task_id: str, state: int) -> pb.TaskStatus:
    async def reached() -> pb.TaskStatus | None:
        status = await client.get(task_id)
        return status if status.state == state else None

    return await eventually(reached, what=f"{task_id} to be {state_name(state)}")


@pytest.fixture
async def front_and_worker(cluster: Cluster) -> tuple[AgentProc, AgentProc]:
    """``front`` serves another model only, so every sdxl task must go to ``worker``."""
    front = cluster.start("front", models='["other"]', max_payload_bytes=64 * 1024,
                          inline_payload_bytes=1024)  # fmt: skip
    worker = cluster.start("worker", max_queue_length=1)
    for agent in (front, worker):
        await until_peers(agent, ["front", "worker"])
    return front, worker


async def test_runs_on_a_peer_and_is_watched_from_the_entry(front_and_worker) -> None:
    front, worker = front_and_worker
    async with front.client() as entry, worker.client() as runner:
        reply = await entry.submit(sleep_task("w-1"))
        assert not reply.existing
        assert reply.status.agent == "worker" and reply.status.path == ["front"]
        events = await follow(entry, "w-1")
        assert events[0].kind == pb.TaskEvent.KIND_STATE
        assert pb.TaskEvent.KIND_PROGRESS in {e.kind for e in events}
        states = [state_name(e.status.state) for e in events if e.kind == pb.TaskEvent.KIND_STATE]
        assert states[-2:] == ["RUNNING", "SUCCEEDED"]
        done = await runner.get("w-1")
    assert done == events[-1].status
    assert done.agent == "worker" and done.attempt == 1
    assert json.loads(done.result.inline)["model"] == "sdxl"
    assert done.result.media_type == "application/json"
    assert done.progress.step == done.progress.total == 3


async def test_cancel_through_another_agent_stops_the_run(front_and_worker) -> None:
    front, _ = front_and_worker
    async with front.client() as entry:
        await entry.submit(sleep_task("long", seconds=300))
        await until_state(entry, "long", pb.TASK_STATE_RUNNING)
        cancelled = await entry.cancel("long", "user gave up")
        assert state_name(cancelled.state) == "CANCELLED"
        assert cancelled.error.message == "user gave up"
        # The slot is free again: the next task runs at once rather than queueing.
        quick = await entry.submit(sleep_task("after", seconds=0))
        assert quick.status.agent == "worker"
        assert state_name((await follow(entry, "after"))[-1].status.state) == "SUCCEEDED"
        again = await entry.cancel("after")  # terminal: cancel changes nothing
        assert state_name(again.state) == "SUCCEEDED"


async def test_a_run_whose_cancel_was_recorded_never_ends_as_a_success(
    front_and_worker, cluster: Cluster
) -> None:
    """A Cancel whose request was written while the task ran, but that never stopped the
    run (it was answered before the run unwound, or the run was between agents), told
    its caller the task had not ended: the run's end must not record a success now."""
    front, _ = front_and_worker
    async with front.client() as entry:
        await entry.submit(sleep_task("told-running", seconds=1.5))
        await until_state(entry, "told-running", pb.TASK_STATE_RUNNING)

        def requested(record: peer_pb2.TaskRecord) -> None:
            record.cancel_requested, record.cancel_reason = True, "user gave up"

        async with client_for([cluster.etcd_endpoint], security=cluster.trust.operator()) as c:
            await TaskStore(EtcdKv(c), KeySpace(cluster.prefix, "west")).update(
                "told-running", requested
            )
        ended = (await follow(entry, "told-running"))[-1].status
    assert state_name(ended.state) == "CANCELLED"
    assert ended.error.message.startswith("user gave up") and not ended.HasField("result")


async def test_resubmit_is_idempotent_and_a_reused_id_is_refused(front_and_worker) -> None:
    front, worker = front_and_worker
    async with front.client() as entry, worker.client() as other:
        first = await entry.submit(sleep_task("same", seconds=0))
        retried = sleep_task("same", seconds=0)
        retried.timeout.FromSeconds(30)  # a retry with a fresh timeout is the same task
        second = await other.submit(retried)
        assert second.existing and second.status.task_id == first.status.task_id
        await follow(entry, "same")
        assert len((await entry.list(user_id="ada")).tasks) == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await entry.submit(sleep_task("same", seconds=5))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


def bad(change) -> pb.TaskSpec:
    spec = sleep_task("bad")
    change(spec)
    return spec


@pytest.mark.parametrize(
    ("spec", "code", "words"),
    [
        (bad(lambda s: setattr(s, "pipeline", "paint")), "INVALID_ARGUMENT", "unknown pipeline"),
        (bad(lambda s: setattr(s, "queue", "gold")), "INVALID_ARGUMENT", "unknown queue"),
        (bad(lambda s: setattr(s.user, "id", "bob")), "PERMISSION_DENIED", "may not submit as"),
        (bad(lambda s: s.ClearField("model")), "INVALID_ARGUMENT", "model"),
        (
            bad(lambda s: setattr(s, "payload", b"x" * (64 * 1024 + 1))),
            "RESOURCE_EXHAUSTED",
            "max_payload_bytes",
        ),
        (bad(lambda s: setattr(s, "payload", b"x" * (2 * MiB))), "RESOURCE_EXHAUSTED", ""),
        (bad(lambda s: s.deadline.FromSeconds(1)), "DEADLINE_EXCEEDED", "passed"),
        (bad(lambda s: setattr(s, "gpu_count", 4)), "RESOURCE_EXHAUSTED", "no eligible agent"),
    ],
)
async def test_bad_input_gets_a_precise_status(
    front_and_worker, spec: pb.TaskSpec, code: str, words: str
) -> None:
    front, _ = front_and_worker
    async with front.client() as entry:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await entry.submit(spec)
        assert caught.value.code().name == code
        assert words in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await entry.get("bad")  # a refused task leaves no record behind
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        done = await entry.submit(sleep_task("fine", seconds=0))  # and the agent is unharmed
        assert done.status.agent == "worker"
    assert front.process.poll() is None


async def test_unknown_ids_are_not_found(front_and_worker) -> None:
    front, _ = front_and_worker
    async with front.client() as entry:
        for call in (entry.get("nope"), entry.cancel("nope"), follow(entry, "nope")):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_full_dc_backlogs_what_it_can_keep_and_refuses_the_rest(
    front_and_worker,
) -> None:
    front, _ = front_and_worker
    async with front.client() as entry:
        await entry.submit(sleep_task("runs", seconds=300))
        await until_state(entry, "runs", pb.TASK_STATE_RUNNING)
        queued = await entry.submit(sleep_task("waits", seconds=0))
        assert state_name(queued.status.state) == "QUEUED" and queued.status.agent == "worker"
        assert queued.status.HasField("expected_start")  # the worker's estimate
        # No agent has room: the task waits in the DC's durable backlog, on no agent.
        backlogged = await entry.submit(sleep_task("backlogged", seconds=0))
        assert state_name(backlogged.status.state) == "QUEUED"
        assert backlogged.status.agent == ""
        assert not backlogged.status.HasField("expected_start")  # no agent to estimate it
        # A payload over the inline limit cannot be kept in etcd: refused, no trace left.
        big = sleep_task("refused", seconds=0)
        big.payload = b"x" * 2048
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await entry.submit(big)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError):
            await entry.get("refused")
        await entry.cancel("runs")
        assert state_name((await follow(entry, "waits"))[-1].status.state) == "SUCCEEDED"
        done = (await follow(entry, "backlogged"))[-1].status
    assert state_name(done.state) == "SUCCEEDED" and done.path[0] == "backlog"


async def test_list_filters_by_user_and_state_and_pages(front_and_worker, cluster) -> None:
    front, _ = front_and_worker
    bob = cluster.trust.user("bob", ["research"], ["submitter"])  # his own tasks only
    async with front.client() as entry, front.client(bob) as bobs:
        await entry.submit(sleep_task("mine", seconds=0))
        other = sleep_task("theirs", seconds=0)
        other.user.id = "bob"
        await bobs.submit(other)
        await follow(entry, "mine")
        await follow(entry, "theirs")
        assert [t.task_id for t in (await entry.list(user_id="bob")).tasks] == ["theirs"]
        assert [t.task_id for t in (await bobs.list()).tasks] == ["theirs"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bobs.list(user_id="ada")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        succeeded = await entry.list(state=pb.TASK_STATE_SUCCEEDED)
        assert sorted(t.task_id for t in succeeded.tasks) == ["mine", "theirs"]
        assert not (await entry.list(state=pb.TASK_STATE_FAILED)).tasks
        first = await entry.list(limit=1)
        assert len(first.tasks) == 1 and first.truncated and first.next_page_token
        second = await entry.list(limit=1, page_token=first.next_page_token)
        assert [t.task_id for t in [*first.tasks, *second.tasks]] == ["mine", "theirs"]
        assert not second.next_page_token
        assert all(not t.spec.payload for t in succeeded.tasks)


async def test_large_payloads_stay_out_of_etcd(front_and_worker) -> None:
    front, _ = front_and_worker
    echo = pb.TaskSpec(task_id="big", user=pb.User(id="ada"), task_type=pb.TASK_TYPE_CUSTOM,
                       pipeline="echo", model="any", payload=b"z" * 4096)  # fmt: skip
    async with front.client() as entry:
        reply = await entry.submit(echo)
        assert not reply.status.spec.payload  # over inline_payload_bytes: not in the record
        assert (await follow(entry, "big"))[-1].status.result.inline == b"z" * 4096


async def test_health_and_reflection_on_every_port(cluster: Cluster) -> None:
    """Open to any caller that completed TLS: no token on the API port, any certificate
    of the mesh on the mTLS port."""
    agent = cluster.start("solo")
    anyone = Security(cluster.trust.mesh, cluster.trust.ca.read_bytes())
    for address, security in ((agent.address, anyone), (agent.peer_address, cluster.as_agent("x"))):
        async with peer_channel(address, security) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "mesh.v1.TaskService", "mesh.v1.PeerService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            async for answer in stream:
                names = {s.name for s in answer.list_services_response.service}
                break
        assert {"mesh.v1.TaskService", "mesh.v1.PeerService", "grpc.health.v1.Health"} <= names


async def test_sigterm_hands_an_interrupted_task_to_a_peer(cluster: Cluster) -> None:
    leaving = cluster.start("leaving", drain_grace_s=0)
    staying = cluster.start("staying")
    await until_peers(leaving, ["leaving", "staying"])
    async with staying.client() as client:
        async with leaving.client() as entry:
            await entry.submit(sleep_task("moved", seconds=1, steps=2))
        await until_state(client, "moved", pb.TASK_STATE_RUNNING)
        leaving.signal(signal.SIGTERM)
        assert leaving.wait() == 0
        done = (await follow(client, "moved"))[-1].status
    assert state_name(done.state) == "SUCCEEDED"
    assert done.agent == "staying" and done.attempt == 2
    assert "leaving" in done.path


async def test_an_agent_restarted_under_its_id_runs_again_what_its_last_run_left(
    cluster: Cluster,
) -> None:
    """Restarted before any owner saw it die (it was the owner, and the only agent), it
    is a member again at once: nobody else would ever write off the task it was running."""
    solo = cluster.start("solo", lease_ttl_s=5)
    async with solo.client() as client:
        await client.submit(sleep_task("left", seconds=2, steps=2))
        await until_state(client, "left", pb.TASK_STATE_RUNNING)
    solo.signal(signal.SIGKILL)
    solo.wait()
    again = cluster.start("solo", lease_ttl_s=5)  # well within the dead run's lease
    async with again.client() as client:
        done = (await follow(client, "left"))[-1].status
    assert (state_name(done.state), done.attempt) == ("SUCCEEDED", 2)


async def test_command_pipeline_through_an_agent(cluster: Cluster) -> None:
    commands = {"gpus": ["sh", "-c", 'printf "$CUDA_VISIBLE_DEVICES"']}
    agent = cluster.start("runner", fake_gpus="2xA100-80GB", commands=json.dumps(commands))
    spec = pb.TaskSpec(task_id="cmd", user=pb.User(id="ada"), task_type=pb.TASK_TYPE_CUSTOM,
                       pipeline="command", model="tool", gpu_count=2)  # fmt: skip
    spec.params["command"] = "gpus"
    async with agent.client() as client:
        await client.submit(spec)
        done = (await follow(client, "cmd"))[-1].status
    assert state_name(done.state) == "SUCCEEDED" and done.result.inline == b"0,1"


async def test_metrics_count_the_work(cluster: Cluster) -> None:
    port = free_port()
    agent = cluster.start("counted", metrics_listen=f"127.0.0.1:{port}")
    async with agent.client() as client:
        await client.submit(sleep_task("m-1", seconds=0))
        await follow(client, "m-1")
        with pytest.raises(grpc.aio.AioRpcError):
            await client.submit(bad(lambda s: setattr(s, "queue", "gold")))

    def finished() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return text if 'gpumesh_tasks_finished_total{state="SUCCEEDED"} 1.0' in text else None

    text = await eventually(finished, what="the finished counter")
    assert "gpumesh_tasks_submitted_total 1.0" in text
    assert 'gpumesh_submit_rejected_total{code="INVALID_ARGUMENT"} 1.0' in text


async def test_a_finished_task_runs_again_for_its_owner(front_and_worker, cluster: Cluster) -> None:
    """Rerun: a new task with the old one's spec and payload, linked to it; idempotent by
    its new id; refused to anyone else, while it runs, and when its payload was not kept."""
    front, _ = front_and_worker
    echo = pb.TaskSpec(task_id="orig", user=pb.User(id="ada"), pipeline="echo", model="any",
                       payload=b"hello again")  # fmt: skip
    bob = cluster.trust.user("bob", roles=["submitter"])
    async with front.client() as entry, front.client(bob) as other:
        await entry.submit(echo)
        assert state_name((await follow(entry, "orig"))[-1].status.state) == "SUCCEEDED"
        again = await entry.rerun("orig", "orig-2")
        assert not again.existing
        assert (again.status.task_id, again.status.spec.rerun_of) == ("orig-2", "orig")
        done = (await follow(entry, "orig-2"))[-1].status
        assert (state_name(done.state), done.result.inline) == ("SUCCEEDED", b"hello again")
        assert (await entry.rerun("orig", "orig-2")).existing  # the same rerun, retried
        big = pb.TaskSpec(task_id="big-1", user=pb.User(id="ada"), pipeline="echo", model="any",
                          payload=b"z" * 4096)  # fmt: skip
        await entry.submit(big)
        await follow(entry, "big-1")
        await entry.submit(sleep_task("busy", seconds=300))
        linked = pb.TaskSpec()
        linked.CopyFrom(echo)
        linked.task_id, linked.rerun_of = "forged", "orig"
        refusals = {
            "someone else's": (other.rerun("orig", "bob-1"), "PERMISSION_DENIED", "own tasks"),
            "still running": (entry.rerun("busy", "busy-2"), "FAILED_PRECONDITION", "not ended"),
            "payload not kept": (entry.rerun("big-1", "big-2"), "FAILED_PRECONDITION", "kept"),
            "unknown": (entry.rerun("nobody", "n-2"), "NOT_FOUND", ""),
            "bad id": (entry.rerun("orig", "no spaces"), "INVALID_ARGUMENT", "task_id"),
            "set by a Submit": (entry.submit(linked), "INVALID_ARGUMENT", "rerun_of"),
        }
        for what, (call, code, words) in refusals.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code().name == code, what
            assert words in (refused.value.details() or ""), what
        await entry.cancel("busy")
