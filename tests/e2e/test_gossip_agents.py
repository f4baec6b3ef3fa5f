"""Gossip between real agent processes over UDP on 127.0.0.1: the router of one agent sees
another's load without any offer between them, through loss, bad packets and key rotation."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request

import aetcd
from support import AgentProc, Cluster, eventually, sleep_spec, until_peers

from mesh.local.localmesh import free_port
from mesh.store.keys import KeySpace
from mesh.v1 import tasks_pb2 as pb

OLD_KEY, NEW_KEY = "old-gossip-key-0001", "new-gossip-key-0002"


def busy_task(task_id: str) -> pb.TaskSpec:
    return sleep_spec(task_id, seconds=300, steps=1, model="hot")


def start_trio(cluster: Cluster, **flags: object) -> tuple[AgentProc, AgentProc, AgentProc]:
    """``a`` runs anything; ``b`` and ``c`` serve another model, so a task for ``hot``
    submitted to ``a`` runs on ``a`` and nobody offers it anywhere."""
    keys = cluster.key_file(OLD_KEY)
    a = cluster.start("a", gossip_key_file=keys, **flags)
    b = cluster.start("b", models='["other"]', gossip_key_file=keys, **flags)
    c = cluster.start("c", models='["other"]', gossip_key_file=keys, **flags)
    return a, b, c


async def seen_running(observer: AgentProc, agent_id: str, running: int) -> bool:
    async with observer.client() as client:
        infos = {i.agent_id: i for i in await client.agents()}
    return agent_id in infos and infos[agent_id].running == running


async def test_the_router_sees_gossiped_load(cluster: Cluster) -> None:
    a, b, c = start_trio(cluster)
    await until_peers(b, ["a", "b", "c"])
    async with a.client() as client:
        await client.submit(busy_task("busy"))
    for observer in (b, c):
        await eventually(
            lambda o=observer: seen_running(o, "a", 1), what="gossip to carry a's load"
        )
    async with b.client() as client:
        route = await client.route(pb.TaskSpec(model="hot", pipeline="sleep"), explain=True)
    assert {c.agent_id: c.tasks for c in route.candidates}["a"] == 1


async def test_gossip_gets_through_packet_loss(cluster: Cluster) -> None:
    a, b, _ = start_trio(cluster, gossip_drop_rate=0.4)
    await until_peers(b, ["a", "b", "c"])
    async with a.client() as client:
        await client.submit(busy_task("lossy"))
    await eventually(lambda: seen_running(b, "a", 1), what="gossip through 40% loss")


async def gossip_address(client: aetcd.Client, prefix: str, agent_id: str) -> tuple[str, int]:
    got = await client.get(KeySpace(prefix, "west").agent(agent_id))
    host, _, port = json.loads(got.value)["gossip_address"].rpartition(":")
    return host, int(port)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


async def test_bad_datagrams_are_dropped_and_counted(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    port = free_port()
    old = cluster.key_file(OLD_KEY)
    a = cluster.start("a", gossip_key_file=old, metrics_listen=f"127.0.0.1:{port}")
    target = await gossip_address(etcd_client, prefix, "a")
    garbage = [
        b"",
        b"GM",
        b"not gossip at all" * 10,
        b"GM\x01\x01" + b"\x00" * 40,
        b"GM\x07\x01" + b"\x00" * 40,
        b"x" * 9000,
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in garbage:
            sock.sendto(datagram, target)

    def counted() -> str | None:
        text = scrape(port)
        reasons = ("short", "not gossip", "bad mac", "wire version", "oversized")
        return text if all(f'reason="{r}"' in text for r in reasons) else None

    await eventually(counted, what="every bad datagram counted")
    async with a.client() as client:
        assert [i.agent_id for i in await client.agents()] == ["a"]  # still serving


async def test_key_rotation_between_agents(cluster: Cluster) -> None:
    port = free_port()
    rotated = cluster.start("rotated", gossip_key_file=cluster.key_file(NEW_KEY, OLD_KEY))
    behind = cluster.start(
        "behind", gossip_key_file=cluster.key_file(OLD_KEY), metrics_listen=f"127.0.0.1:{port}"
    )
    await until_peers(rotated, ["behind", "rotated"])
    async with behind.client() as client:
        await client.submit(busy_task("old-key-load"))
    # rotated accepts the old key, so it hears behind; behind cannot check the new key.
    await eventually(lambda: seen_running(rotated, "behind", 1), what="old key accepted")
    await eventually(lambda: 'reason="bad mac"' in scrape(port), what="new key refused")


async def test_a_member_leaving_etcd_leaves_the_view(cluster: Cluster) -> None:
    a, _, c = start_trio(cluster)
    await until_peers(a, ["a", "b", "c"])
    c.signal(signal.SIGTERM)
    assert c.wait() == 0
    await until_peers(a, ["a", "b"])
    async with a.client() as client:
        assert "c" not in {i.agent_id for i in await client.agents()}
