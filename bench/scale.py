"""``python -m bench scale [--sizes 1000,10000] [--churn-s S] [--json]``: a DC of thousands.

Two parts per size, both in the same run as their baseline:

- **The router, in process.** A fleet of that size (heterogeneous GPUs, as ``bench route``)
  with its request classes made, then joins and leaves one at a time:
  ``ring_update_ms_p50/p99`` is what one change costs (``Router.update_members``), beside
  ``full_rebuild_ms``, a ring built from scratch for the fleet (what every change cost
  before); ``route_p50_us`` is a decision after the churn; ``router_mb`` the memory the
  view takes.
- **A real agent.** One ``mesh-agent`` with its own etcd (TLS on), fed a membership of
  that size through etcd itself (registrations under a lease, written by this bench), then
  churned at ``--churn-per-s`` joins and leaves a second for ``--churn-s`` seconds while it
  answers health checks and Submits. Printed: ``loop_lag_ms_p99`` (its event loop's
  lateness, from its own ``gpumesh_event_loop_lag_seconds``: the upper bound of the bucket
  the 99th percentile falls in), ``health_ms_p99``/``max``, ``submit_ms_p99``, ``rss_mb``,
  ``etcd_events_per_s`` (membership watch events the agent received), ``false_death``
  (whether its own registration went away or was made again, under a new lease, during
  the run) and ``registration_rewrites`` (times the agent republished it meanwhile: its
  state changed, not its life).

Simulated agents do not gossip (no UDP socket answers for them): gossip at this size is
measured by ``bench gossip``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import tracemalloc
import urllib.request

from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.e2e import echo, rss_mb
from bench.localdc import one_dc, until
from bench.route import make_fleet
from mesh.client import MeshClient
from mesh.core.ring import HashRing
from mesh.core.router import Router
from mesh.core.routing import Request
from mesh.gpus import Gpu
from mesh.local.localmesh import LocalMesh
from mesh.store.etcd import client_for
from mesh.store.keys import KeySpace
from mesh.store.registry import AgentRecord

PIPELINE = "sleep"
BATCH = 100  # registrations per etcd transaction


def _ms(samples_ns: list[int], q: int) -> float:
    return round(statistics.quantiles(samples_ns, n=100, method="inclusive")[q - 1] / 1e6, 3)


def in_process(size: int, changes: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    fleet = make_fleet(size, rng)
    tracemalloc.start()
    router = Router()
    router.set_members(a.member() for a in fleet)
    asks = [Request(f"t{i}", f"m{i % 20}", PIPELINE, gpu_count=1 + i % 2) for i in range(400)]
    for request in asks:
        router.route(request)  # every class made before the churn
    router_mb = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    started = time.perf_counter()
    HashRing({a.name: a.weight for a in fleet})
    rebuild_ms = (time.perf_counter() - started) * 1000
    newcomers = make_fleet(changes, random.Random(seed + 1))
    samples: list[int] = []
    for i, newcomer in enumerate(newcomers):
        newcomer.name = f"new-{i}"
        leaving = fleet.pop(rng.randrange(len(fleet)))
        for change in ({leaving.name: None}, {newcomer.name: newcomer.member()}):
            begun = time.perf_counter_ns()
            router.update_members(change)
            samples.append(time.perf_counter_ns() - begun)
        fleet.append(newcomer)
    routes: list[int] = []
    for request in asks * 5:
        begun = time.perf_counter_ns()
        router.route(request)
        routes.append(time.perf_counter_ns() - begun)
    return {
        "ring_update_ms_p50": _ms(samples, 50),
        "ring_update_ms_p99": _ms(samples, 99),
        "full_rebuild_ms": round(rebuild_ms, 1),
        "route_p50_us": round(statistics.median(routes) / 1000, 1),
        "router_mb": round(router_mb, 1),
    }


def simulated(i: int) -> AgentRecord:
    return AgentRecord(
        agent_id=f"sim-{i:06d}",
        dc="dc",
        address="127.0.0.1:9",
        gpus=(Gpu(0, f"GPU-sim-{i}", "NVIDIA A100-SXM4-80GB", 81920, "A100"),),
        weight=1.0,
        pipelines=(PIPELINE,),
        models=(),
        peer_address="127.0.0.1:9",
    )


def scrape(address: str) -> dict[str, list[tuple[str, float]]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if line.startswith("gpumesh_"):
            name, _, value = line.rpartition(" ")
            found.setdefault(name.split("{")[0], []).append((name, float(value)))
    return found


def lag_p99_ms(before: dict, after: dict) -> float:
    """The upper bound of the lag bucket the 99th percentile falls in, between two scrapes."""

    def buckets(scraped: dict) -> dict[float, float]:
        out = {}
        for name, value in scraped.get("gpumesh_event_loop_lag_seconds_bucket", []):
            bound = name.split('le="')[1].split('"')[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = value
        return out

    old, new = buckets(before), buckets(after)
    counts = {le: new[le] - old.get(le, 0.0) for le in sorted(new)}
    total = counts[float("inf")]
    for le, cumulative in counts.items():
        if cumulative >= 0.99 * total:
            return le * 1000
    return float("inf")


async def live(mesh: LocalMesh, size: int, per_s: float, churn_s: float) -> dict:
    agent = next(s for s in mesh.started if s.kind == "agent")
    keys = KeySpace(mesh.topology.prefix, "dc")
    assert mesh.trust is not None
    security = mesh.trust.user("bench")
    async with client_for(mesh.topology.dcs["dc"].etcd, security=mesh.operator) as etcd:
        published = await etcd.get(keys.agent(agent.name))  # where it serves /metrics
        assert published is not None
        metrics_at = AgentRecord.from_json(published.value).metrics_url
        metrics_at = metrics_at.removeprefix("http://").removesuffix("/metrics")
        lease = await etcd.lease(3600)
        tx = etcd.transactions
        for start in range(0, size, BATCH):
            puts = [
                tx.put(keys.agent(f"sim-{i:06d}"), simulated(i).to_json(), lease=lease.id)
                for i in range(start, min(size, start + BATCH))
            ]
            await etcd.transaction(compare=[], success=puts, failure=[])
        registered = await until(
            lambda: _members(metrics_at, size + 1), limit_s=max(60.0, size / 50)
        )
        own = await etcd.get(keys.agent(agent.name))
        assert own is not None
        async with MeshClient(agent.address, security) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            before = scrape(metrics_at)
            checks: list[int] = []
            submits: list[int] = []
            stop = asyncio.Event()

            async def check() -> None:
                while not stop.is_set():
                    begun = time.perf_counter_ns()
                    await health.Check(health_pb2.HealthCheckRequest())
                    checks.append(time.perf_counter_ns() - begun)
                    await asyncio.sleep(0.02)

            async def submit() -> None:
                n = 0
                while not stop.is_set():
                    begun = time.perf_counter_ns()
                    await client.submit(echo(f"scale-{size}-{n}"))
                    submits.append(time.perf_counter_ns() - begun)
                    n += 1
                    await asyncio.sleep(0.05)

            probes = [asyncio.create_task(check()), asyncio.create_task(submit())]
            changes = 0
            began = time.monotonic()
            rng = random.Random(size)
            serial = size
            while time.monotonic() - began < churn_s:
                gone = rng.randrange(serial)
                await etcd.delete(keys.agent(f"sim-{gone:06d}"))
                await etcd.put(
                    keys.agent(f"sim-{serial:06d}"), simulated(serial).to_json(), lease=lease.id
                )
                serial += 1
                changes += 2
                await asyncio.sleep(max(0.0, began + changes / 2 / per_s - time.monotonic()))
            stop.set()
            await asyncio.gather(*probes)
            after = scrape(metrics_at)
        still = await etcd.get(keys.agent(agent.name))
        await etcd.revoke_lease(lease.id)
    return {
        "register_s": round(registered, 1),
        "loop_lag_ms_p99": lag_p99_ms(before, after),
        "health_ms_p99": _ms(checks, 99),
        "health_ms_max": round(max(checks) / 1e6, 3),
        "submit_ms_p99": _ms(submits, 99),
        "rss_mb": round(rss_mb(agent.pid), 1),
        "etcd_events_per_s": round(changes / churn_s, 1),
        # A death is the registration gone or made again (a new lease, a new incarnation);
        # its value changing is the agent republishing its state, counted apart.
        "false_death": still is None or still.create_revision != own.create_revision,
        "registration_rewrites": 0 if still is None else still.version - own.version,
    }


async def _members(metrics_at: str, want: int) -> bool:
    seen = scrape(metrics_at).get("gpumesh_members", [("", 0.0)])[0][1]
    return seen >= want


def measure_live(size: int, per_s: float, churn_s: float) -> dict:
    agents = [{"id": "real", "fake_gpus": "1xA100-80GB"}]
    with one_dc("bench-scale", agents, 90, decision_log=False) as mesh:
        return asyncio.run(live(mesh, size, per_s, churn_s))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--changes", type=int, default=200, help="in-process joins + leaves")
    parser.add_argument("--churn-per-s", type=float, default=10.0)
    parser.add_argument("--churn-s", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, dict] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        result[str(size)] = {
            **in_process(size, args.changes, args.seed),
            **measure_live(size, args.churn_per_s, args.churn_s),
        }
    if args.json:
        print(json.dumps(result))
        return
    names = list(next(iter(result.values())))
    print(f"{'':<22}" + "".join(f"{size:>12}" for size in result))
    for name in names:
        print(f"{name:<22}" + "".join(f"{r[name]!s:>12}" for r in result.values()))
