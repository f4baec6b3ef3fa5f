"""``meshctl demo``: a mixed workload over a local 2-DC mesh, followed live, then a report.

The workload is seeded: models drawn from a skewed (Zipf-like) distribution, mostly
simulated GPU work (``sleep``, with a model-load cost where the model is cold), some
``echo`` and ``command`` tasks, a fifth in the ``vip`` class, and a few cancelled by the
client through a different agent than the one they ran on. Most tasks enter the first DC
of the topology, so it fills up, overflows to the other, and what neither can take waits
in the DCs' durable backlogs; the report shows where each task came from. A
task is *lost* when its Submit was accepted but it never reached a terminal state; the
demo fails if any is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from mesh.client import MeshClient
from mesh.core.task import TERMINAL, state_name
from mesh.local.localmesh import LocalMesh
from mesh.local.trust import LOAD_ROLES
from mesh.v1 import tasks_pb2 as pb

USER = "demo"
# (model, task type, weight in the mix): a skewed popularity, as real traffic is.
MODELS = [
    ("sdxl-1.0", pb.TASK_TYPE_T2I, 30),
    ("llama3-8b", pb.TASK_TYPE_LLM, 20),
    ("flux-dev", pb.TASK_TYPE_T2I, 12),
    ("esrgan-x4", pb.TASK_TYPE_SUPER_RESOLUTION, 8),
    ("xtts-v2", pb.TASK_TYPE_TTS, 6),
    ("sd-inpaint", pb.TASK_TYPE_I2I, 4),
]
RETRYABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
SUBMIT_TRIES = 30
CANCEL_SHARE = 0.03
HOT_DC_SHARE = 0.75  # of tasks submitted to the first DC
FINISH_TIMEOUT_S = 180.0


def workload(count: int, seed: int) -> list[pb.TaskSpec]:
    rng = random.Random(seed)
    weights = [w for _, _, w in MODELS]
    specs = []
    for i in range(count):
        model, task_type, _ = rng.choices(MODELS, weights)[0]
        spec = pb.TaskSpec(
            task_id=f"demo-{seed}-{i:04d}",
            user=pb.User(id=USER, group="demo"),
            task_type=task_type,
            model=model,
            queue="vip" if rng.random() < 0.2 else "normal",
        )
        roll = rng.random()
        if roll < 0.85:
            spec.pipeline = "sleep"
            spec.params.update(seconds=f"{rng.uniform(0.2, 1.2):.2f}", steps="4")
        elif roll < 0.95:
            spec.pipeline = "echo"
            spec.payload = rng.randbytes(rng.randint(16, 4096))
        else:
            spec.pipeline = "command"
            spec.params["command"] = "checksum"
            spec.payload = rng.randbytes(1024)
        spec.timeout.FromSeconds(120)
        specs.append(spec)
    return specs


@dataclass
class Tally:
    accepted: dict[str, str]  # task id -> DC it was submitted in
    rejected: Counter[str]


async def _submit(
    clients: dict[str, list[MeshClient]],
    specs: list[pb.TaskSpec],
    rng: random.Random,
    tally: Tally,
    on_done: Callable[[], None],
) -> None:
    gate = asyncio.Semaphore(16)

    async def one(spec: pb.TaskSpec) -> None:
        hot, *others = clients
        dc = hot if not others or rng.random() < HOT_DC_SHARE else rng.choice(others)
        client = rng.choice(clients[dc])
        async with gate:
            for attempt in range(SUBMIT_TRIES):
                try:
                    await client.submit(spec)
                    tally.accepted[spec.task_id] = dc
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE or attempt == SUBMIT_TRIES - 1:
                        tally.rejected[exc.code().name] += 1
                        break
                    await asyncio.sleep(min(1.0, 0.1 * 2**attempt) * (0.5 + rng.random()))
        on_done()

    await asyncio.gather(*(one(s) for s in specs))


async def _cancel_some(
    clients: dict[str, list[MeshClient]],
    tally: Tally,
    statuses: dict[str, pb.TaskStatus],
    rng: random.Random,
    count: int,
) -> int:
    """Cancel a few tasks still under way, each through the last agent of the DC it was
    submitted to: mostly not the agent running it, often not even its DC."""
    ids = sorted(t for t in tally.accepted if t in statuses and statuses[t].state not in TERMINAL)
    chosen = rng.sample(ids, k=min(len(ids), max(1, int(count * CANCEL_SHARE))))
    for task_id in chosen:
        dc_clients = clients[tally.accepted[task_id]]
        # Already finished, or its agent busy: the report shows how it really ended.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await dc_clients[-1].cancel(task_id, "demo: the user changed their mind")
    return len(chosen)


async def _statuses(clients: dict[str, list[MeshClient]]) -> dict[str, pb.TaskStatus]:
    found: dict[str, pb.TaskStatus] = {}
    for dc_clients in clients.values():
        found.update({s.task_id: s for s in await dc_clients[0].list_all(user_id=USER)})
    return found


async def _backlog_depth(clients: dict[str, list[MeshClient]]) -> int:
    """Tasks waiting in the DCs' durable backlogs now."""
    depth = 0
    for dc_clients in clients.values():
        reply = await dc_clients[0].queue()
        depth += sum(c.depth for c in reply.classes)
    return depth


async def _run(mesh: LocalMesh, count: int, seed: int, console: Console) -> int:
    rng = random.Random(seed)
    by_dc: dict[str, list[MeshClient]] = defaultdict(list)
    assert mesh.trust is not None
    security = mesh.trust.user(USER, groups=["demo"], roles=LOAD_ROLES)  # a user's token
    for s in mesh.started:
        if s.kind == "agent":
            by_dc[s.dc].append(MeshClient(s.address, security))
    dc_of = {s.name: s.dc for s in mesh.started if s.kind == "agent"}
    specs = workload(count, seed)
    tally = Tally({}, Counter())
    started = time.monotonic()
    statuses: dict[str, pb.TaskStatus] = {}
    try:
        with Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
        ) as progress:
            sent = progress.add_task("submitted", total=count, note="")
            ended = progress.add_task("finished", total=count, note="")
            submitting = asyncio.create_task(
                _submit(by_dc, specs, rng, tally, lambda: progress.advance(sent))
            )
            cancelled = 0
            deadline = time.monotonic() + FINISH_TIMEOUT_S
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                statuses = await _statuses(by_dc)
                states = Counter(state_name(s.state) for s in statuses.values())
                done = sum(
                    1 for t in tally.accepted if statuses.get(t) and statuses[t].state in TERMINAL
                )
                waiting = await _backlog_depth(by_dc)
                progress.update(
                    ended,
                    completed=done,
                    total=len(tally.accepted) or count,
                    note=" ".join(f"{k.lower()}={v}" for k, v in sorted(states.items()))
                    + f" backlog={waiting}",
                )
                if not cancelled and len(tally.accepted) > count // 2:
                    cancelled = await _cancel_some(by_dc, tally, statuses, rng, count)
                if submitting.done() and done == len(tally.accepted):
                    break
            await submitting
            statuses = await _statuses(by_dc)
    finally:
        for c in (c for cs in by_dc.values() for c in cs):
            await c.close()
    elapsed = time.monotonic() - started
    lost = [t for t in tally.accepted if t not in statuses or statuses[t].state not in TERMINAL]
    _report(console, tally, statuses, lost, elapsed, dc_of)
    return len(lost)


def _per_agent(
    tally: Tally, statuses: dict[str, pb.TaskStatus], dc_of: dict[str, str]
) -> dict[tuple[str, str], Counter[str]]:
    """How the accepted tasks ended on each agent, and how they got there."""
    per_agent: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for task_id in tally.accepted:
        s = statuses.get(task_id)
        if s is None:
            continue
        row = per_agent[(s.dc, s.agent or "-")]
        row[state_name(s.state)] += 1
        came_from = s.path[0] if s.path else ""
        row["backlog"] += came_from == "backlog"
        row["forwarded"] += bool(s.path) and came_from != "backlog"
        row["overflow"] += came_from in dc_of and dc_of[came_from] != s.dc
        if s.spec.pipeline == "sleep" and s.result.inline:
            row["cold"] += json.loads(s.result.inline).get("cold_start", False)
    return per_agent


AGENT_COLUMNS = {
    "succeeded": "SUCCEEDED",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
    "forwarded": "forwarded",
    "from other DC": "overflow",
    "from backlog": "backlog",
    "cold starts": "cold",
}


def _report(
    console: Console,
    tally: Tally,
    statuses: dict[str, pb.TaskStatus],
    lost: list[str],
    elapsed: float,
    dc_of: dict[str, str],
) -> None:
    per_agent = _per_agent(tally, statuses, dc_of)
    table = Table("dc", "agent", *AGENT_COLUMNS, title="where tasks ran")
    for (dc, agent), c in sorted(per_agent.items()):
        table.add_row(dc, agent, *(str(c[key]) for key in AGENT_COLUMNS.values()))
    console.print(table)
    ends = Counter(state_name(statuses[t].state) for t in tally.accepted if t in statuses)
    summary = Table(
        "submitted",
        "accepted",
        "rejected",
        "succeeded",
        "failed",
        "cancelled",
        "overflowed",
        "backlogged",
        "lost",
        "seconds",
        title="how tasks ended",
    )
    summary.add_row(
        str(len(tally.accepted) + sum(tally.rejected.values())),
        str(len(tally.accepted)),
        ", ".join(f"{v} {k}" for k, v in tally.rejected.items()) or "0",
        str(ends["SUCCEEDED"]),
        str(ends["FAILED"]),
        str(ends["CANCELLED"]),
        str(sum(c["overflow"] for c in per_agent.values())),
        str(sum(c["backlog"] for c in per_agent.values())),
        f"[red]{len(lost)}[/red]" if lost else "0",
        f"{elapsed:.1f}",
    )
    console.print(summary)
    _print_failures(console, tally, statuses, lost)


def _print_failures(
    console: Console, tally: Tally, statuses: dict[str, pb.TaskStatus], lost: list[str]
) -> None:
    failed = [
        statuses[t]
        for t in tally.accepted
        if t in statuses and statuses[t].state == pb.TASK_STATE_FAILED
    ]
    for s in failed[:5]:
        console.print(f"failed {s.task_id}: {s.error.code} {s.error.message}")
    for task_id in lost[:10]:
        s = statuses.get(task_id)
        console.print(
            f"[red]lost[/red] {task_id}: "
            f"{state_name(s.state) + ' on ' + s.agent if s else 'no record'}"
        )


def run_demo(mesh: LocalMesh, count: int, seed: int, console: Console) -> int:
    """Run the workload on a started mesh; return how many accepted tasks were lost."""
    return asyncio.run(_run(mesh, count, seed, console))
