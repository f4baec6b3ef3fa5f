"""``python -m bench gossip [--json]``: how fast a load change reaches every agent of a DC,
and what gossip costs in bytes.

* **In-process**, 100 and 1,000 agents: the real ``Gossiper`` (msgpack, HMAC, digests,
  news) on the in-memory network with a simulated clock (sub-millisecond to 2 ms delivery),
  after ``WARM_UP_S`` of simulated time (every agent holds every other by then). One
  agent's load changes; the time until each other agent holds it is one sample. Bytes are
  counted over the second after the change.
* **Real agents**, ``--agents`` (20) ``mesh-agent`` processes on loopback with one etcd:
  a task is submitted to one agent, which runs it where no offer tells anyone; every other
  agent is polled (``ListAgents``, every 20 ms) until its view shows the task.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from bench.localdc import one_dc, until
from mesh.gossip.memory import Network
from mesh.gossip.state import AgentState
from mesh.local.localmesh import LocalMesh

WARM_UP_S = 2.5


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return round(statistics.median(ordered), 3), round(p99, 3)


def in_process(size: int, seed: int) -> tuple[float, float, float]:
    """(p50 s, p99 s, bytes per second per agent) on a simulated DC of ``size``."""
    net = Network(size, seed=seed)
    net.run_until(WARM_UP_S)
    start, seen = net.now, {}

    def watch(observer: str, state: AgentState, now: float) -> None:
        if state.agent_id == "a0000" and state.queued == {"normal": 1}:
            seen.setdefault(observer, now - start)

    net.watch = watch
    net.agents["a0000"].update_own(queued={"normal": 1})
    sent_before = net.bytes_sent()
    net.run_until(start + 1.0)
    per_agent = (net.bytes_sent() - sent_before) / (net.now - start) / size
    net.run_until(start + 10.0, stop=lambda: len(seen) == size - 1)
    if len(seen) < size - 1:
        raise RuntimeError(f"only {len(seen)} of {size - 1} agents saw the change in 10 s")
    return (*_percentiles(list(seen.values())), round(per_agent))


def real_agents(count: int) -> tuple[float, float]:
    """(p50 s, p99 s) over ``count - 1`` observers of real agent processes."""
    agents = [
        {"id": f"g{i:02d}", "fake_gpus": "1xA100-80GB"} | ({} if i == 0 else {"models": ["other"]})
        for i in range(count)
    ]
    with one_dc("bench", agents, timeout_s=120) as mesh:
        return asyncio.run(_converge(mesh))


async def _converge(mesh: LocalMesh) -> tuple[float, float]:
    from mesh.client import MeshClient
    from mesh.v1 import tasks_pb2 as pb

    agents = [s for s in mesh.started if s.kind == "agent"]
    assert mesh.trust is not None
    security = mesh.trust.user("bench")
    clients = {s.name: MeshClient(s.address, security) for s in agents}
    try:
        for client in clients.values():  # everyone sees everyone, through etcd
            await until(lambda c=client: _sees_all(c, len(agents)))
        await asyncio.sleep(1.0)  # gossip settles
        spec = pb.TaskSpec(
            task_id="bench",
            user=pb.User(id="bench"),
            pipeline="sleep",
            model="hot",
            task_type=pb.TASK_TYPE_CUSTOM,
        )
        spec.params["seconds"] = "60"
        started = time.monotonic()
        await clients["g00"].submit(spec)
        seen = await asyncio.gather(
            *(_until_seen(c, started) for name, c in clients.items() if name != "g00")
        )
        return _percentiles(list(seen))
    finally:
        for client in clients.values():
            await client.close()


async def _sees_all(client: object, count: int) -> bool:
    return len(await client.agents()) == count  # type: ignore[attr-defined]


async def _sees_task(client: object) -> bool:
    infos = {i.agent_id: i for i in await client.agents()}  # type: ignore[attr-defined]
    return infos["g00"].running == 1


async def _until_seen(client: object, started: float) -> float:
    await until(lambda: _sees_task(client))
    return time.monotonic() - started


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench gossip", description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sizes", default="100,1000", help="simulated DC sizes")
    parser.add_argument("--agents", type=int, default=20, help="real agent processes (0: none)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    result: dict[str, dict[str, float]] = {
        "converge_p50_s": {},
        "converge_p99_s": {},
        "bytes_per_s_per_agent": {},
    }
    for size in (int(s) for s in args.sizes.split(",")):
        p50, p99, rate = in_process(size, args.seed)
        result["converge_p50_s"][str(size)] = p50
        result["converge_p99_s"][str(size)] = p99
        result["bytes_per_s_per_agent"][str(size)] = rate
    if args.agents:
        p50, p99 = real_agents(args.agents)
        result["converge_p50_s"][f"{args.agents} processes"] = p50
        result["converge_p99_s"][f"{args.agents} processes"] = p99
    if args.json:
        print(json.dumps({**result, "seconds": round(time.monotonic() - began, 1)}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "agents",
        "converge p50 s",
        "converge p99 s",
        "bytes/s per agent",
        title="a load change reaching every agent of the DC",
    )
    for key in result["converge_p50_s"]:
        rate = result["bytes_per_s_per_agent"].get(key)
        table.add_row(
            key,
            str(result["converge_p50_s"][key]),
            str(result["converge_p99_s"][key]),
            str(rate) if rate is not None else "-",
        )
    Console().print(table)
    print(f"{time.monotonic() - began:.1f} s")
