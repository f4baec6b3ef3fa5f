"""Membership with real agent processes on a real etcd: join, see peers, die, leave."""

from __future__ import annotations

import json
import signal
import time

import aetcd
from support import Cluster, eventually, until_peers

from mesh.store.keys import KeySpace

TTL_S = 2


async def agent_keys(client: aetcd.Client, prefix: str, dc: str = "west") -> dict[str, dict]:
    listing = await client.get_prefix(KeySpace(prefix, dc).agents)
    return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in listing}


async def test_agents_register_and_see_each_other(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    a = cluster.start("a", fake_gpus="2xH100-80GB", models='["sdxl"]')
    cluster.start("b", fake_gpus="1xT4-16GB")
    cluster.start("c", dc="east")  # another DC: not a peer in this skeleton's view
    keys = await agent_keys(etcd_client, prefix)
    assert sorted(keys) == ["a", "b"]
    assert keys["a"]["address"] == a.address
    assert [g["gpu_class"] for g in keys["a"]["gpus"]] == ["H100", "H100"]
    assert keys["a"]["weight"] > keys["b"]["weight"]
    assert keys["a"]["models"] == ["sdxl"] and keys["a"]["state"] == "active"
    await until_peers(a, ["a", "b"])


async def test_sigkill_frees_the_key_within_ttl(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    cluster.start("survivor", lease_ttl_s=TTL_S)
    victim = cluster.start("victim", lease_ttl_s=TTL_S)
    victim.signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    await eventually(
        lambda: _gone(etcd_client, prefix, "victim"),
        timeout_s=TTL_S + 1,
        what=f"the dead agent's key to expire within TTL+1 s ({TTL_S + 1} s)",
    )
    assert time.monotonic() - killed_at <= TTL_S + 1
    await until_peers(cluster.agents[0], ["survivor"])


async def _gone(client: aetcd.Client, prefix: str, agent_id: str) -> bool:
    return agent_id not in await agent_keys(client, prefix)


async def test_sigterm_revokes_the_lease_before_exit(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    leaving = cluster.start("leaving", lease_ttl_s=30)
    assert "leaving" in await agent_keys(etcd_client, prefix)
    leaving.signal(signal.SIGTERM)
    assert leaving.wait() == 0, leaving.log_tail()
    # No waiting: with a 30 s TTL, only the revoke can have removed the key by now.
    assert "leaving" not in await agent_keys(etcd_client, prefix)
