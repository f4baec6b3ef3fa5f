"""``python -m bench e2e [--tasks N] [--concurrency C] [--json]``: the mesh end to end.

Starts the local mesh as ``meshctl up`` does (two DCs, three agents each, security on),
submits ``--tasks`` no-op ``echo`` tasks at ``--concurrency`` spread over all six agents
through the public API, and reports from that one run:

- ``accepted_per_s`` (Submits answered) and ``completed_per_s`` (tasks terminal, seen by a
  watch on each DC's records, from the first Submit to the last end);
- sequential ``submit_p50_ms`` / ``submit_p99_ms`` on one agent, beside ``health_p50_ms``,
  a ``grpc.health.v1`` check on the same port: the floor a call cannot beat;
- ``etcd_writes_per_task``: revisions etcd made during the load (each a raft proposal:
  one transaction, however many keys it touches) per task, and ``etcd_keys_per_task``,
  the keys put or deleted, both from etcd's own metrics; ``idle_writes_per_s`` is the
  same revisions counted while nothing is submitted (the mesh's background writes);
  ``etcd_calls_per_task``, the unary calls etcd served per task by method (``Txn``,
  ``Range``...): the round trips to etcd, reads included, that the writes do not show;
- CPU seconds per task for the agents, etcd and this client, and etcd's db size before
  and after;
- ``start_p50_ms`` / ``start_p99_ms``: from a Submit sent to its task RUNNING (the
  record's ``started_at``, same machine, same clock), under the load, and
  ``idle_start_p50_ms`` / ``idle_start_p99_ms`` for the sequential Submits, one at a time
  on an otherwise idle mesh: the latency an online task pays before its GPU works.

``--via stream`` submits the same tasks over one ``SubmitStream`` per agent instead of
``--concurrency`` Submit calls in flight (the stream holds 64 Submits under way itself).

``--profile DIR`` samples every agent and this client with py-spy during the load
(``bench/profile.py``) and adds each one's ten costliest functions to the figures.

``--soak MINUTES --rate R`` (not in CI) holds R tasks/s for that long instead, and prints
etcd's db size and the agents' memory every ``--every`` seconds; ``--retention S`` and
``--compaction 1m`` shorten what the mesh and etcd keep, so that a soak of minutes shows
where a day's would settle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import profile as profiles
from bench.localdc import local_mesh
from mesh.channels import Security
from mesh.client import MeshClient
from mesh.core.task import TERMINAL
from mesh.local.localmesh import LocalMesh, Started
from mesh.store.etcd import client_for, watch_events
from mesh.store.keys import KeySpace
from mesh.store.reads import decode
from mesh.v1 import tasks_pb2 as pb

LOCAL = Path(__file__).resolve().parent.parent / "topology" / "local.yaml"
TICKS = os.sysconf("SC_CLK_TCK")
SEQUENTIAL = 200
IDLE_S = 5.0
METRICS = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_debugging_mvcc_current_revision",
    "etcd_mvcc_db_total_size_in_bytes",
)
HANDLED = "grpc_server_handled_total{"
CALL_METHOD = re.compile(r'grpc_method="(\w+)"')


def etcd_metrics(member: Started) -> dict[str, float]:
    """The figures of ``METRICS`` from an etcd member's own /metrics, and the unary calls
    it served by method (``calls:Txn``...): the round trips the agents made to it."""
    with urllib.request.urlopen(f"http://{member.metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = dict.fromkeys(METRICS, 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in found:
            found[name] = float(value)
        elif name.startswith(HANDLED) and 'grpc_type="unary"' in name:
            method = CALL_METHOD.search(name)
            if method is not None:
                key = f"calls:{method.group(1)}"
                found[key] = found.get(key, 0.0) + float(value)
    return found


def cpu_s(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def quantile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def echo(task_id: str) -> pb.TaskSpec:
    return pb.TaskSpec(
        task_id=task_id,
        user=pb.User(id="bench"),
        task_type=pb.TASK_TYPE_CUSTOM,
        pipeline="echo",
        model="sdxl-1.0",
        payload=b"x",
    )


class Ends:
    """Tasks seen terminal in any DC's records, by a watch per DC (no polling), with when
    each began running (wall seconds)."""

    def __init__(self, mesh: LocalMesh, ids: set[str]) -> None:
        self._mesh = mesh
        self._waiting = set(ids)
        self.done = asyncio.Event()
        self.last_end = 0.0
        self.started: dict[str, float] = {}
        self._watches: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for dc, spec in self._mesh.topology.dcs.items():
            client = client_for(spec.etcd, security=self._mesh.operator)
            await client.connect()
            root = KeySpace(self._mesh.topology.prefix, dc).root
            revision = (await client.get_prefix(root + b"none/")).header.revision
            self._watches.append(asyncio.create_task(self._follow(client, dc, revision + 1)))

    async def _follow(self, client: object, dc: str, revision: int) -> None:
        keys = KeySpace(self._mesh.topology.prefix, dc)
        async for event in watch_events(client, keys.tasks, prefix=True, start_revision=revision):  # type: ignore[arg-type]
            if not event.kv.value:
                continue
            status = decode(event.kv.value).status
            if status.state in TERMINAL and status.task_id in self._waiting:
                self._waiting.discard(status.task_id)
                if status.HasField("started_at"):
                    self.started[status.task_id] = status.started_at.ToNanoseconds() / 1e9
                self.last_end = time.monotonic()
                if not self._waiting:
                    self.done.set()

    def stop(self) -> None:
        for watch in self._watches:
            watch.cancel()


async def run_load(
    clients: list[MeshClient], ids: list[str], concurrency: int, sent: dict[str, float]
) -> float:
    """Submit every id, ``concurrency`` at once over all clients, noting in ``sent`` when
    each was sent (wall seconds); the last answer's time."""
    queue = list(reversed(ids))
    last = 0.0

    async def worker(n: int) -> None:
        nonlocal last
        client = clients[n % len(clients)]
        while queue:
            task_id = queue.pop()
            sent[task_id] = time.time()
            await client.submit(echo(task_id))
            last = time.monotonic()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return last


def start_ms(
    sent: dict[str, float], started: dict[str, float], prefix: str = ""
) -> dict[str, float]:
    """Submit sent to RUNNING, p50 and p99 in ms, of the tasks ``started`` knows."""
    waits = [(started[t] - sent[t]) * 1000 for t in sent if t in started]
    return {
        f"{prefix}start_p50_ms": round(quantile(waits, 50), 2),
        f"{prefix}start_p99_ms": round(quantile(waits, 99), 2),
    }


async def run_stream(clients: list[MeshClient], ids: list[str], sent: dict[str, float]) -> float:
    """Submit every id over one SubmitStream per agent (its share, round robin), noting
    when each was sent; the last answer's time."""
    last = 0.0

    def requests(share: list[str]) -> Iterator[pb.SubmitStreamRequest]:
        for task_id in share:
            sent[task_id] = time.time()
            yield pb.SubmitStreamRequest(spec=echo(task_id), ref=task_id)

    async def one(client: MeshClient, share: list[str]) -> None:
        nonlocal last
        async for answer in client.submit_stream(requests(share)):
            if answer.WhichOneof("answer") == "error":
                raise RuntimeError(f"{answer.ref}: {answer.error.code} {answer.error.message}")
            last = time.monotonic()

    n = len(clients)
    await asyncio.gather(*(one(c, ids[i::n]) for i, c in enumerate(clients)))
    return last


async def sequential(agent: Started, security: Security, mesh: LocalMesh) -> dict[str, float]:
    ids = [f"seq-{i}" for i in range(SEQUENTIAL)]
    ends, sent = Ends(mesh, set(ids)), {}
    await ends.start()
    async with MeshClient(agent.address, security) as client:
        submits, checks = [], []
        health = health_pb2_grpc.HealthStub(client.channel)
        for task_id in ids:
            sent[task_id] = time.time()
            started = time.perf_counter()
            await client.submit(echo(task_id))
            submits.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest())
            checks.append((time.perf_counter() - started) * 1000)
    await asyncio.wait_for(ends.done.wait(), timeout=60)
    ends.stop()
    return {
        "submit_p50_ms": round(quantile(submits, 50), 2),
        "submit_p99_ms": round(quantile(submits, 99), 2),
        "health_p50_ms": round(quantile(checks, 50), 2),
        **start_ms(sent, ends.started, "idle_"),
    }


async def measure(
    mesh: LocalMesh, tasks: int, concurrency: int, profile: Path | None = None, via: str = "unary"
) -> dict[str, object]:
    assert mesh.trust is not None
    security = mesh.trust.user("bench")
    agents = [s for s in mesh.started if s.kind == "agent"]
    etcds = [s for s in mesh.started if s.kind == "etcd"]
    clients = [MeshClient(a.address, security) for a in agents]
    try:
        await run_load(clients, [f"warm-{i}" for i in range(60)], 8, {})  # connections, models
        idle_before = sum(etcd_metrics(e)["etcd_debugging_mvcc_current_revision"] for e in etcds)
        await asyncio.sleep(IDLE_S)
        idle_after = sum(etcd_metrics(e)["etcd_debugging_mvcc_current_revision"] for e in etcds)
        before = [etcd_metrics(e) for e in etcds]
        cpu_before = {s.pid: cpu_s(s.pid) for s in mesh.started}
        client_before = client_cpu_s()
        ids = [f"e2e-{i:06d}" for i in range(tasks)]
        ends, sent = Ends(mesh, set(ids)), {}
        await ends.start()
        pids = {a.name: a.pid for a in agents} | {"client": os.getpid()}
        with profiles.maybe(profile, pids) as profiled:
            started = time.monotonic()
            if via == "stream":
                last_accept = await run_stream(clients, ids, sent)
            else:
                last_accept = await run_load(clients, ids, concurrency, sent)
            await asyncio.wait_for(ends.done.wait(), timeout=600)
        ends.stop()
        after = [etcd_metrics(e) for e in etcds]
        cpu_after = {s.pid: cpu_s(s.pid) for s in mesh.started}
        client_spent = client_cpu_s() - client_before
    finally:
        for client in clients:
            await client.close()

    def delta(name: str) -> float:
        return sum(a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True))

    methods = sorted({k for a in after for k in a if k.startswith("calls:")})

    def spent(kind: str) -> float:
        pids = [s.pid for s in mesh.started if s.kind == kind]
        return sum(cpu_after[p] - cpu_before[p] for p in pids)

    figures: dict[str, object] = {
        "tasks": tasks,
        "via": via,
        "concurrency": concurrency,
        "accepted_per_s": round(tasks / (last_accept - started), 1),
        "completed_per_s": round(tasks / (ends.last_end - started), 1),
        "etcd_writes_per_task": round(delta("etcd_debugging_mvcc_current_revision") / tasks, 2),
        "etcd_keys_per_task": round(
            (delta("etcd_mvcc_put_total") + delta("etcd_mvcc_delete_total")) / tasks, 2
        ),
        "etcd_calls_per_task": {
            m.removeprefix("calls:"): round(delta(m) / tasks, 2) for m in methods if delta(m) > 0
        },
        "idle_writes_per_s": round((idle_after - idle_before) / IDLE_S, 2),
        "cpu_ms_per_task": {
            "agents": round(spent("agent") / tasks * 1000, 2),
            "etcd": round(spent("etcd") / tasks * 1000, 2),
            "client": round(client_spent / tasks * 1000, 2),
        },
        "db_bytes_before": int(sum(b["etcd_mvcc_db_total_size_in_bytes"] for b in before)),
        "db_bytes_after": int(sum(a["etcd_mvcc_db_total_size_in_bytes"] for a in after)),
        **start_ms(sent, ends.started),
    }
    figures.update(await sequential(agents[0], security, mesh))
    if profiled is not None:
        figures["profile"] = profiled.tops()
    return figures


async def soak(mesh: LocalMesh, minutes: float, rate: float, every_s: float) -> None:
    assert mesh.trust is not None
    security = mesh.trust.user("bench")
    agents = [s for s in mesh.started if s.kind == "agent"]
    etcds = [s for s in mesh.started if s.kind == "etcd"]
    clients = [MeshClient(a.address, security) for a in agents]
    gate = asyncio.Semaphore(256)
    sent = 0

    async def one(n: int) -> None:
        async with gate:
            await clients[n % len(clients)].submit(echo(f"soak-{n:08d}"))

    inflight: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    next_report = started
    print(f"{'min':>6}{'sent':>10}{'db MiB':>9}{'agents RSS MiB':>16}")
    while (now := time.monotonic()) - started < minutes * 60:
        due = int((now - started) * rate)
        while sent < due:
            task = asyncio.create_task(one(sent))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            sent += 1
        if now >= next_report:
            db = sum(etcd_metrics(e)["etcd_mvcc_db_total_size_in_bytes"] for e in etcds)
            rss = sum(rss_mb(a.pid) for a in agents)
            print(
                f"{(now - started) / 60:>6.1f}{sent:>10}{db / 2**20:>9.1f}{rss:>16.0f}", flush=True
            )
            next_report += every_s
        await asyncio.sleep(0.01)
    await asyncio.gather(*inflight, return_exceptions=True)
    for client in clients:
        await client.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--soak", type=float, default=0.0, metavar="MINUTES")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--retention", type=float, default=86400.0, metavar="S")
    parser.add_argument("--compaction", default="10m")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy every agent here")
    parser.add_argument(
        "--via", choices=("unary", "stream"), default="unary", help="Submit calls or SubmitStreams"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    document = yaml.safe_load(LOCAL.read_text())
    document["prefix"] = "bench-e2e"
    document["local"].update(task_retention_s=args.retention, etcd_compaction=args.compaction)
    with local_mesh(document, timeout_s=90) as mesh:
        if args.soak:
            asyncio.run(soak(mesh, args.soak, args.rate, args.every))
            return
        result = asyncio.run(measure(mesh, args.tasks, args.concurrency, args.profile, args.via))
    if args.json:
        print(json.dumps(result))
        return
    for name, value in result.items():
        if name != "profile":
            print(f"{name:<24}{value}")
    for process, costs in dict(result.get("profile", {})).items():  # type: ignore[call-overload]
        print(f"\n{process}: top {len(costs)} by self time")
        for function, share in costs:
            print(f"  {share:>6.1%}  {function}")
