"""``python -m bench failover [--json]``: how long the DC is without a queue owner after
the owner is SIGKILLed, and how long a task whose agent is SIGKILLed waits to run again.

Both are bounded by the membership lease TTL (5 s, the default): a dead process is only
known dead when its lease expires. The baseline printed beside them is that TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

from bench.localdc import one_dc, until
from mesh.client import MeshClient
from mesh.local.localmesh import LocalMesh, Started
from mesh.store.election import Election
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.v1 import tasks_pb2 as pb

TTL_S = 5.0  # the agents' default lease_ttl_s


async def _owner(mesh: LocalMesh) -> str | None:
    client = client_for(mesh.topology.dcs["dc"].etcd, security=mesh.operator)
    await client.connect()
    try:
        keys = KeySpace(mesh.topology.prefix, "dc")
        found = await Election(EtcdKv(client), keys.election, lambda: 0, b"").leader()
        return found[0].decode().split()[0] if found else None
    finally:
        await client.close()


def _kill(agent: Started) -> float:
    os.killpg(agent.pid, signal.SIGKILL)
    return time.monotonic()


async def measure(mesh: LocalMesh) -> dict[str, float]:
    agents = {s.name: s for s in mesh.started if s.kind == "agent"}
    await until(lambda: _owner_is_not(mesh, None))
    first = await _owner(mesh)
    killed = _kill(agents[first])  # type: ignore[index]
    await until(lambda: _owner_is_not(mesh, first, None))
    owner_gap = time.monotonic() - killed
    entry = next(a for name, a in agents.items() if name != first)

    assert mesh.trust is not None
    async with MeshClient(entry.address, mesh.trust.user("bench")) as client:
        spec = pb.TaskSpec(
            task_id="orphan",
            user=pb.User(id="bench"),
            pipeline="sleep",
            model="m",
            task_type=pb.TASK_TYPE_CUSTOM,
        )
        spec.params["seconds"] = "30"
        await client.submit(spec)

        async def state() -> pb.TaskStatus:
            return await client.get("orphan")

        await until(lambda: _running(state, 1))
        runner = (await state()).agent
        killed = _kill(agents[runner])
        await until(lambda: _running(state, 2))
        rerun = time.monotonic() - killed
    return {
        "owner_failover_s": round(owner_gap, 2),
        "orphan_rerun_s": round(rerun, 2),
        "lease_ttl_s": TTL_S,
    }


async def _owner_is_not(mesh: LocalMesh, *ids: str | None) -> bool:
    return await _owner(mesh) not in ids


async def _running(state, attempt: int) -> bool:  # type: ignore[no-untyped-def]
    status = await state()
    return status.state == pb.TASK_STATE_RUNNING and status.attempt == attempt


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench failover", description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    # The task's model is served by a1, a2 and a3: whichever agent led the queue (killed
    # first), a kill of the task's runner leaves one to run it again.
    agents = [
        {"id": f"a{i}", "fake_gpus": "1xA100-80GB"} | ({"models": ["other"]} if i < 1 else {})
        for i in range(4)
    ]
    with one_dc("failover", agents, timeout_s=60) as mesh:
        result = asyncio.run(measure(mesh))
    if args.json:
        print(json.dumps(result))
        return
    print(f"queue owner SIGKILLed -> new owner after {result['owner_failover_s']} s")
    print(
        f"running agent SIGKILLed -> task running again (attempt 2) after "
        f"{result['orphan_rerun_s']} s"
    )
    print(f"baseline: the membership lease TTL, {TTL_S} s")
