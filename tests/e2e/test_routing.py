"""Routing with real agents and real etcd: bounded loads, refusals, overflow across DCs,
hop limits and loops, topology reloads, explain, and the replayable decision log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from support import (
    Cluster,
    cli_operator,
    eventually,
    peer_channel,
    sleep_spec,
    until_peers,
    wait_log,
)
from typer.testing import CliRunner

from mesh.cli import app
from mesh.client import MeshClient
from mesh.core import summaries
from mesh.core.task import TERMINAL, state_name
from mesh.local.etcdserver import EtcdMember
from mesh.local.trust import LocalTrust
from mesh.store import topostore
from mesh.store.etcd import client_for
from mesh.store.keys import KeySpace
from mesh.topology import Topology, parse
from mesh.v1 import peer_pb2, peer_pb2_grpc
from mesh.v1 import tasks_pb2 as pb

runner = CliRunner()


def task(task_id: str, model: str = "hot", seconds: float = 300, **fields: object) -> pb.TaskSpec:
    return sleep_spec(task_id, seconds=seconds, steps=2, model=model, **fields)


def topology(prefix: str, dcs: dict[str, dict], **routing: float) -> Topology:
    return parse({"prefix": prefix, "dcs": dcs, "routing": routing}, "test topology")


async def apply(t: Topology, cluster: Cluster) -> None:
    report = await topostore.apply(t, cluster.trust.operator())
    assert all(r.startswith("applied") for r in report.values()), report


async def final(client: MeshClient, task_id: str) -> pb.TaskStatus:
    last = None
    async for event in client.watch(task_id, timeout_s=60):
        last = event.status
        if last.state in TERMINAL:
            break
    assert last is not None
    return last


async def placed(client: MeshClient, task_id: str) -> pb.TaskStatus:
    """The task's status once it is queued or running somewhere (through any proxy)."""

    async def probe() -> pb.TaskStatus | None:
        status = await client.get(task_id)
        return status if status.agent else None

    return await eventually(probe, what=f"{task_id} to be placed")


async def test_a_hot_model_spills_to_a_second_agent(cluster: Cluster) -> None:
    a = cluster.start("a")
    cluster.start("b")
    await until_peers(a, ["a", "b"])
    async with a.client() as client:
        first = await client.submit(task("hot-1"))
        second = await client.submit(task("hot-2"))
        route = await client.route(task("probe"), explain=True)
    # One GPU each: the home of the hot model is full after one task, so the bound sends
    # the second to the next agent on the ring, which the explain output confirms.
    assert first.status.agent != second.status.agent
    ring = [c.agent_id for c in route.candidates if c.eligible]
    assert ring[0] == first.status.agent and ring[1] == second.status.agent


async def test_a_refused_offer_goes_to_the_next_candidate(cluster: Cluster) -> None:
    # The entry gossips with its own key: it hears nobody, so its view of the others is
    # what offers tell it, and a peer filled behind its back can refuse it.
    entry = cluster.start(
        "entry",
        decision_log=cluster.workdir / "entry.jsonl",
        gossip_key_file=cluster.key_file("a key nobody else has"),
    )
    others = [cluster.start(name) for name in ("x", "y")]
    await until_peers(entry, ["entry", "x", "y"])
    async with entry.client() as client:
        # A model whose home is a peer: we want a peer to refuse, not the entry itself.
        for model in (f"m{i}" for i in range(50)):
            home = (await client.route(task("probe", model=model))).targets[0].name
            if home != "entry":
                break
        home_proc = next(p for p in others if p.agent_id == home)
        # Fill the home behind the entry's back: the entry still thinks it is idle.
        async with home_proc.client() as direct:
            await direct.submit(task("filler", model="other"))
        done = await client.submit(task("refused-then-placed", model=model))
    assert done.status.agent != home
    decisions = [
        json.loads(line) for line in (cluster.workdir / "entry.jsonl").read_text().splitlines()
    ]
    mine = [d for d in decisions if d["request"]["task_id"] == "refused-then-placed"]
    assert mine[0]["decision"]["targets"][0]["name"] == home
    code = runner.invoke(app, ["replay", str(cluster.workdir / "entry.jsonl")])
    assert code.exit_code == 0, code.output
    assert "0 different" in code.output


async def test_loops_and_hop_limits_are_refused(cluster: Cluster) -> None:
    agent = cluster.start("a")
    admitted = task("loop", queue="normal", gpu_count=1)  # as its entry agent sends it
    envelope = peer_pb2.Envelope(
        spec=admitted, path=["x", "a"], hops=2, attempt=1, deadline_unix_ms=2**62
    )
    async with peer_channel(agent.peer_address, cluster.as_agent("x")) as channel:
        peer = peer_pb2_grpc.PeerServiceStub(channel)
        looped = await peer.Offer(envelope)
        envelope.path[:] = ["x", "y", "z"]
        envelope.hops = 4
        too_far = await peer.Offer(envelope)
    # A deadline no record can hold, from another DC: refused, not a crash.
    envelope.path[:], envelope.hops, envelope.origin_dc = ["x"], 1, "elsewhere"
    envelope.deadline_unix_ms = 2**62
    elsewhere = cluster.as_agent("x", "elsewhere")
    async with peer_channel(agent.peer_address, elsewhere) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await peer_pb2_grpc.PeerServiceStub(channel).Offer(envelope)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "deadline out of range" in (caught.value.details() or "")
    assert not looped.accepted and "loop" in looped.reason
    assert not too_far.accepted and "hop limit" in too_far.reason
    assert looped.load.running == 0  # every reply carries the receiver's load


async def test_a_full_dc_spills_to_the_next_dc_in_topology_order(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    etcds = {dc: more_etcd(dc) for dc in ("west", "east", "north")}
    agents = {
        dc: cluster.start(
            f"{dc}-1", dc=dc, etcd_endpoints=json.dumps([etcds[dc].endpoint]), max_queue_length=1
        )
        for dc in etcds
    }
    dcs = {
        dc: {
            "etcd": [etcds[dc].endpoint],
            "seeds": [agents[dc].peer_address],
            "overflow": (
                [{"dc": "east", "weight": 1000}, {"dc": "north", "weight": 0.001}]
                if dc == "west"
                else []
            ),
            "max_spill_share": 1.0,
        }
        for dc in etcds
    }
    await apply(topology(prefix, dcs), cluster)
    for proc in agents.values():
        wait_log(proc, "topology version 1 applied")
    async with agents["west"].client() as west:
        where = []
        for i in range(6):  # each DC holds two: one running, one queued
            reply = await west.submit(task(f"t{i}"))
            where.append((await placed(west, f"t{i}")).dc)
            assert reply.status.task_id == f"t{i}"
        waits = await west.submit(task("one-too-many"))  # every DC full: west's backlog
        assert where == ["west", "west", "east", "east", "north", "north"]
        assert waits.status.dc == "west" and waits.status.agent == ""
        # Through the entry agent: Get, Cancel and Watch reach the DC that runs it.
        remote = await west.get("t2")
        assert remote.agent == "east-1" and remote.path == ["west-1"]
        # Offered back to west (east's owner re-placing it after a death, say), west
        # refuses: it handed the task away, and taking it back would leave two records
        # pointing at each other and nobody running it.
        back = peer_pb2.Envelope(
            spec=remote.spec, path=["east-1"], hops=1, attempt=2,
            deadline_unix_ms=remote.deadline.ToMilliseconds(), origin_dc="east",
        )  # fmt: skip
        east_agent = cluster.as_agent("east-9", "east")
        async with peer_channel(agents["west"].peer_address, east_agent) as channel:
            refused = await peer_pb2_grpc.PeerServiceStub(channel).Offer(back)
        assert not refused.accepted and "it belongs to DC east" in refused.reason
        cancelled = await west.cancel("t2", "not needed")
        assert state_name(cancelled.state) == "CANCELLED"
        assert state_name((await final(west, "t2")).state) == "CANCELLED"
        # Listed once through any DC: east records it, west only points there.
        assert [t.task_id for t in (await west.list()).tasks].count("t2") == 1
    async with agents["east"].client() as east:
        assert [t.task_id for t in (await east.list()).tasks].count("t2") == 1


async def test_agents_follow_topology_versions_and_ignore_bad_ones(
    cluster: Cluster, etcd: EtcdMember, prefix: str, etcd_client
) -> None:
    agent = cluster.start("a")
    dcs = {"west": {"etcd": [etcd.endpoint]}}
    await apply(topology(prefix, dcs, load_factor=1.25), cluster)
    wait_log(agent, "topology version 1 applied")
    async with agent.client() as client:
        before = (await client.route(task("probe"))).bound
        await apply(topology(prefix, dcs, load_factor=2.5), cluster)
        wait_log(agent, "topology version 2 applied")
        after = (await client.route(task("probe"))).bound
        assert after == pytest.approx(before * 2)
        await etcd_client.put(topostore.key(prefix), b'{"version": 3, "topology": {"dcs": {}}}')
        wait_log(agent, "ignoring the applied topology")
        assert (await client.route(task("probe"))).bound == after


def test_meshctl_topology_commands(
    tmp_path: Path, more_etcd, prefix: str, trust: LocalTrust
) -> None:
    etcd = more_etcd("solo")
    operator = cli_operator(trust)
    path = tmp_path / "t.yaml"
    path.write_text(f"prefix: {prefix}\ndcs: {{west: {{etcd: ['{etcd.endpoint}']}}}}\n")
    assert runner.invoke(app, ["topology", "validate", str(path)]).exit_code == 0
    differs = runner.invoke(app, [*operator, "topology", "diff", str(path)])
    assert differs.exit_code == 1 and "+prefix:" in differs.output
    applied = runner.invoke(app, [*operator, "topology", "apply", str(path)])
    assert applied.exit_code == 0 and "applied v1" in applied.output
    again = runner.invoke(app, [*operator, "topology", "apply", str(path)])
    assert "unchanged (v1)" in again.output
    assert runner.invoke(app, [*operator, "topology", "diff", str(path)]).exit_code == 0
    path.write_text(path.read_text() + "routing: {load_factor: 1.5}\n")
    changed = runner.invoke(app, [*operator, "topology", "diff", str(path)])
    assert changed.exit_code == 1 and "+  load_factor: 1.5" in changed.output
    assert "applied v2" in runner.invoke(app, [*operator, "topology", "apply", str(path)]).output
    shown = runner.invoke(app, [*operator, "topology", "show", str(path)])
    assert "v2" in shown.output and "load_factor: 1.5" in shown.output
    path.write_text("dcs: {West: {etcd: []}}")
    bad = runner.invoke(app, ["topology", "validate", str(path)])
    assert bad.exit_code == 1 and "dcs.West.etcd" in bad.output


async def test_meshctl_route_explains(cluster: Cluster) -> None:
    agent = cluster.start("a", fake_gpus="2xH100-80GB")
    cluster.start("b", models='["other"]')
    await until_peers(agent, ["a", "b"])
    result = await asyncio.to_thread(
        runner.invoke,
        app,
        [
            *cluster.cli_user(),
            "route",
            "--model",
            "sdxl",
            "--pipeline",
            "sleep",
            "--explain",
            "-o",
            "json",
            "--endpoint",
            agent.address,
        ],
    )
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output)
    assert reply["targets"][0]["name"] == "a"
    verdicts = {c["agent_id"]: c["verdict"] for c in reply["candidates"]}
    assert verdicts == {"a": "picked", "b": "not eligible"}


async def test_dc_summaries_give_live_agents_say_when_a_dc_is_full_and_carry_demand(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    etcds = {dc: more_etcd(dc) for dc in ("west", "east")}
    west = cluster.start(
        "w1", dc="west", max_queue_length=1, etcd_endpoints=json.dumps([etcds["west"].endpoint])
    )
    east = cluster.start(
        "e1",
        dc="east",
        max_queue_length=1,
        etcd_endpoints=json.dumps([etcds["east"].endpoint]),
        plan_interval_s=0.3,
    )
    dcs = {
        "west": {
            "etcd": [etcds["west"].endpoint],
            "seeds": [west.peer_address],
            "overflow": [{"dc": "east"}],
            "max_spill_share": 1.0,
        },
        # No way to reach east from its seeds: only its summary can say where its agents are.
        "east": {"etcd": [etcds["east"].endpoint], "seeds": ["127.0.0.1:1"]},
    }
    await apply(topology(prefix, dcs), cluster)
    west_etcd = client_for([etcds["west"].endpoint], security=cluster.trust.operator())
    await west_etcd.connect()

    async def east_summary(tasks: int) -> bool:
        got = await west_etcd.get(KeySpace(prefix, "west").summary("east"))
        return got is not None and summaries.decode(got.value).tasks == tasks

    try:
        await eventually(lambda: east_summary(0), what="east's summary stored in west")
        async with west.client() as client:
            for i in range(2):  # w1: one running, one queued: full
                await client.submit(task(f"w{i}"))
            await client.submit(task("spills"))
            assert (await placed(client, "spills")).agent == "e1"
            async with east.client() as direct:
                await direct.submit(task("fills-east"))
            await eventually(lambda: east_summary(2), what="east's summary to show it full")
            decision = await client.route(task("probe"))
            assert [t.kind for t in decision.targets] == ["backlog"]
            waits = await client.submit(task("backlogged"))  # east is not even tried
            assert waits.status.dc == "west" and waits.status.agent == ""

            async def east_asks_for_hot() -> bool:  # and what east's tasks ask for
                heard = {r.dc: r for r in (await client.queue()).remote}
                return "east" in heard and heard["east"].demand.get("hot", 0.0) > 0

            await eventually(east_asks_for_hot, what="east's demand in its summary, in west")
    finally:
        await west_etcd.close()
