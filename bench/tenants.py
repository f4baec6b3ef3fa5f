"""``python -m bench tenants [--json]``: three tenants sharing a local mesh.

One DC of two agents with four fake GPUs each. ``heavy`` (share 2, capped at 6 GPUs),
``light`` (share 1) and ``flood`` (share 1) keep batch work queued; ``light`` also sends
online calls (LLM tasks). Run twice on the same mesh, the same workload: first with tenants
switched off (no tenants file: no caps, the queue classes alone; online work keeps its
default 70% share), then with the tenants policy (``fair_share``, online share 0.5).
Printed for each: every tenant's share of GPU time (batch and online) while all three are
saturated, against its target; ``max_share_error``; ``jain_index`` of the two equal-share
tenants; online waits (queued to running) with the flood and without; ``reclaim_p99_s``
(an online task arriving in the batch-saturated DC, queued to running); and
``quota_violations`` (run starts at which a group held more GPUs than its cap, from the
records).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import yaml

from bench.localdc import one_dc
from mesh.client import MeshClient
from mesh.local.localmesh import LocalMesh
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.quota import POLICY, apply_policy
from mesh.v1 import tasks_pb2 as pb

SHARES = {"heavy": 2, "light": 1, "flood": 1}
CAPS = {"heavy": 6}
POLICY_DOC = {
    "priority": {"policy": "fair_share", "aging_s": 600},
    "online_share": 0.5,
    "groups": {
        group: {"share": share, **({"max_gpus": CAPS[group]} if group in CAPS else {})}
        for group, share in SHARES.items()
    },
}
BATCH_S, ONLINE_S = 0.3, 0.1
OUTSTANDING = 16  # batch tasks each tenant keeps submitted and not ended


def spec(task_id: str, seconds: float, online: bool) -> pb.TaskSpec:
    made = pb.TaskSpec(
        task_id=task_id,
        pipeline="sleep",
        model="m",
        task_type=pb.TASK_TYPE_LLM if online else pb.TASK_TYPE_T2I,
    )
    made.params.update(seconds=str(seconds), steps="1")
    return made


class Tenant:
    def __init__(self, group: str, client: MeshClient, tag: str) -> None:
        self.group = group
        self.client = client
        self.tag = tag
        self.ids: list[str] = []
        self._serial = itertools.count()

    def new_id(self, kind: str) -> str:
        task_id = f"{self.tag}-{self.group}-{kind}-{next(self._serial):05d}"
        self.ids.append(task_id)
        return task_id

    async def keep_busy(self, until: float) -> None:
        """Keep ``OUTSTANDING`` batch tasks submitted and not ended until ``until``."""
        pending: set[str] = set()
        while time.monotonic() < until:
            while len(pending) < OUTSTANDING:
                task_id = self.new_id("b")
                await self.client.submit(spec(task_id, BATCH_S, online=False))
                pending.add(task_id)
            await asyncio.sleep(0.2)
            listed = [await self.client.get(t) for t in list(pending)]
            pending -= {s.task_id for s in listed if s.state >= pb.TASK_STATE_SUCCEEDED}

    async def online(self, until: float, every_s: float) -> list[str]:
        sent = []
        while time.monotonic() < until:
            task_id = self.new_id("o")
            await self.client.submit(spec(task_id, ONLINE_S, online=True))
            sent.append(task_id)
            await asyncio.sleep(every_s)
        return sent


async def statuses(client: MeshClient, ids: list[str]) -> list[pb.TaskStatus]:
    async def ended() -> list[pb.TaskStatus]:
        found = [await client.get(t) for t in ids]
        return found if all(s.state >= pb.TASK_STATE_SUCCEEDED for s in found) else []

    deadline = time.monotonic() + 120
    while not (found := await ended()):
        if time.monotonic() > deadline:
            raise RuntimeError("tasks did not end within 120 s")
        await asyncio.sleep(0.5)
    return found


def _s(ts: object) -> float:
    return ts.ToNanoseconds() / 1e9  # type: ignore[attr-defined]


def gpu_time(done: list[pb.TaskStatus], start: float, end: float) -> dict[str, float]:
    """GPU-seconds each group ran inside [start, end] (wall clock)."""
    spent = dict.fromkeys(SHARES, 0.0)
    for status in done:
        if not status.HasField("started_at"):
            continue
        began, ended = _s(status.started_at), _s(status.finished_at)
        overlap = max(0.0, min(ended, end) - max(began, start))
        spent[status.spec.user.group] += overlap * max(1, status.spec.gpu_count)
    return spent


def violations(done: list[pb.TaskStatus]) -> int:
    """Instants (run starts) at which a capped group held more GPUs than its cap."""
    found = 0
    for group, cap in CAPS.items():
        edges = []
        for status in done:
            if status.spec.user.group == group and status.HasField("started_at"):
                edges += [(_s(status.started_at), 1), (_s(status.finished_at), -1)]
        held = 0
        for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
            held += delta
            found += held > cap
    return found


def waits(done: list[pb.TaskStatus]) -> list[float]:
    return sorted(
        max(0.0, _s(s.started_at) - _s(s.created_at)) for s in done if s.HasField("started_at")
    )


def pct(samples: list[float], q: float) -> float:
    return round(samples[min(len(samples) - 1, int(len(samples) * q))], 3) if samples else 0.0


async def phase(mesh: LocalMesh, tag: str, seconds: float) -> dict[str, object]:
    agent = next(s for s in mesh.started if s.kind == "agent")
    assert mesh.trust is not None
    clients = {
        group: MeshClient(agent.address, mesh.trust.user(f"u-{group}", groups=[group]))
        for group in SHARES
    }
    try:
        tenants = {g: Tenant(g, c, tag) for g, c in clients.items()}
        light = tenants["light"]
        quiet = await light.online(time.monotonic() + seconds / 4, 0.3)  # no flood yet
        quiet_waits = waits(await statuses(light.client, quiet))
        began = time.time()
        end = time.monotonic() + seconds
        busy = [asyncio.create_task(t.keep_busy(end)) for t in tenants.values()]
        await asyncio.sleep(seconds / 4)  # saturated from here
        saturated_from = time.time()
        loud = await light.online(end - seconds / 8, 0.5)
        window = (saturated_from, time.time())
        await asyncio.gather(*busy)
        done = []
        for tenant in tenants.values():
            done += await statuses(tenant.client, [i for i in tenant.ids if "-b-" in i])
        online_done = await statuses(light.client, loud)
        loud_waits = waits(online_done)
    finally:
        for client in clients.values():
            await client.close()
    spent = gpu_time(done + online_done, *window)  # a tenant's online work counts too
    total = sum(spent.values()) or 1.0
    share = {g: round(v / total, 4) for g, v in spent.items()}
    target = {g: w / sum(SHARES.values()) for g, w in SHARES.items()}
    equal = [share[g] / target[g] for g in ("light", "flood")]
    return {
        "share": share,
        "target": {g: round(t, 4) for g, t in target.items()},
        "max_share_error": round(max(abs(share[g] - target[g]) for g in SHARES), 4),
        "jain_index": round(sum(equal) ** 2 / (len(equal) * sum(x * x for x in equal)), 4),
        "online_wait_p50_s": pct(loud_waits, 0.5),
        "online_wait_p99_s": pct(loud_waits, 0.99),
        "online_wait_unloaded_p50_s": pct(quiet_waits, 0.5),
        "online_wait_unloaded_p99_s": pct(quiet_waits, 0.99),
        "reclaim_p99_s": pct(loud_waits, 0.99),
        "quota_violations": violations(done),
        "batch_tasks": len(done),
        "seconds": round(time.time() - began, 1),
    }


async def with_policy(mesh: LocalMesh, document: dict | None) -> None:
    keys = KeySpace(mesh.topology.prefix, "dc")
    async with client_for(mesh.topology.dcs["dc"].etcd, security=mesh.operator) as etcd:
        if document is None:
            await etcd.delete(keys.quota + POLICY.encode())
        else:
            await apply_policy(EtcdKv(etcd), keys, yaml.safe_dump(document))
    await asyncio.sleep(1.0)  # the agents' mirrors: a watch event away


def run(seconds: float) -> dict[str, object]:
    agents = [{"id": f"t{i}", "fake_gpus": "4xA100-80GB"} for i in (1, 2)]
    with one_dc("bench-tenants", agents, 90, decision_log=False, max_queue_length=2) as mesh:

        async def both() -> dict[str, object]:
            await with_policy(mesh, None)
            off = await phase(mesh, "off", seconds)
            await with_policy(mesh, POLICY_DOC)
            on = await phase(mesh, "on", seconds)
            return {"tenants_off": off, "tenants_on": on}

        return asyncio.run(both())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench tenants", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seconds", type=float, default=24.0, help="each phase's length")
    args = parser.parse_args(argv)
    result = run(args.seconds)
    if args.json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    figures = [k for k in result["tenants_on"] if k not in ("share", "target")]  # type: ignore[union-attr]
    table = Table("figure", "tenants off", "tenants on", title="three tenants on 8 GPUs")
    for group in SHARES:
        table.add_row(
            f"share of {group} (target {POLICY_DOC['groups'][group]['share']}/4)",
            *(str(result[k]["share"][group]) for k in ("tenants_off", "tenants_on")),  # type: ignore[index]
        )
    for figure in figures:
        table.add_row(figure, *(str(result[k][figure]) for k in ("tenants_off", "tenants_on")))  # type: ignore[index]
    Console().print(table)
