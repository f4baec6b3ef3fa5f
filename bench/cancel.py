"""``python -m bench cancel [--tasks N] [--json]``: one mesh to its users, measured.

On a local mesh shaped like ``meshctl up``'s (two DCs, three agents each, small local
queues), ``--tasks`` 2-second tasks are submitted to random agents of both DCs, so both
backlogs are deep; then each task is read and cancelled through a random agent of *either*
DC, as a user who does not know where it is would. It reports the share of those Gets and
Cancels that succeeded, and how long each cancelled task took to end, from the Cancel
call to the terminal state its Get shows, for tasks waiting (in a backlog or an agent's
queue) and tasks running when cancelled. The floor beside them is a plain Get's latency
in the same run: nothing is seen to end faster than a Get can show it. A Cancel answered
UNAVAILABLE is tried again as the SDK would (``cancel_retries`` counts those answers: a
task being handed to the other DC says "retry" until the hand-off settles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import grpc
import yaml

from bench.localdc import local_mesh
from mesh.client import MeshClient
from mesh.core.task import TERMINAL, state_name
from mesh.errors import MeshError
from mesh.local.trust import LOAD_ROLES
from mesh.v1 import tasks_pb2 as pb

LOCAL = Path(__file__).resolve().parent.parent / "topology" / "local.yaml"
CONCURRENCY = 32
POLL_S = 0.05
TASK_S = 2.0
END_S = 30.0  # a cancelled task not ended this long after its Cancel is reported, not awaited
CANCEL_RETRY_S = (0.05, 0.2, 0.5, 1.0, 2.0)  # the SDK's backoff


def _spec(task_id: str, rng: random.Random) -> pb.TaskSpec:
    spec = pb.TaskSpec(
        task_id=task_id,
        user=pb.User(id="bench"),
        task_type=pb.TASK_TYPE_T2I,
        pipeline="sleep",
        model="sdxl-1.0",
        queue=rng.choice(["vip", "normal", "normal"]),
    )
    spec.params.update(seconds=str(TASK_S), steps="4")
    return spec


async def _cancel(
    clients: list[MeshClient], rng: random.Random, task_id: str, retried: Counter[str]
) -> pb.TaskStatus:
    """A Cancel through a random agent, tried again on UNAVAILABLE as the SDK does (a
    Cancel is safe to repeat, and UNAVAILABLE says "retry": a task being handed to the
    other DC answers it until the hand-off settles); each retry is counted."""
    for delay in CANCEL_RETRY_S:
        try:
            return await rng.choice(clients).cancel(task_id, "bench")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            retried[exc.details() or ""] += 1
        await asyncio.sleep(delay)
    return await rng.choice(clients).cancel(task_id, "bench")


def _quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"count": 0}
    cuts = (
        statistics.quantiles(samples, n=100, method="inclusive")
        if len(samples) > 1
        else samples * 99
    )
    return {
        "count": len(samples),
        "p50_s": round(cuts[49], 3),
        "p99_s": round(cuts[98], 3),
        "max_s": round(max(samples), 3),
    }


async def measure(clients: list[MeshClient], count: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(CONCURRENCY)
    ids = [f"cancel-{seed}-{i:04d}" for i in range(count)]

    async def submit(task_id: str) -> bool:
        async with gate:
            try:
                await rng.choice(clients).submit(_spec(task_id, rng))
                return True
            except Exception:  # refused (no room anywhere): not part of the measurement
                return False

    submitted = await asyncio.gather(*map(submit, ids))
    accepted = [i for i, ok in zip(ids, submitted, strict=True) if ok]
    reads: list[bool] = []
    errors: Counter[str] = Counter()
    gets: list[float] = []
    ended: dict[str, list[float]] = {"waiting": [], "running": []}
    ignored: list[str] = []  # a Cancel that saw the task unfinished, and then a success
    never_ended: dict[str, str] = {}  # cancelled, and still not terminal after END_S
    retried: Counter[str] = Counter()  # UNAVAILABLE answers a Cancel was retried after

    async def cancel(task_id: str) -> None:
        async with gate:
            client = rng.choice(clients)  # often an agent of the other DC
            try:
                started = time.monotonic()
                before = await client.get(task_id)
                gets.append(time.monotonic() - started)
                reads.append(True)
            except grpc.aio.AioRpcError as exc:
                reads.append(False)
                errors[f"Get {exc.code().name}: {exc.details()}"] += 1
                return
            if before.state in TERMINAL:
                return
            kind = "running" if state_name(before.state) == "RUNNING" else "waiting"
            sent = time.monotonic()
            try:
                status = await _cancel(clients, rng, task_id, retried)
            except grpc.aio.AioRpcError as exc:
                reads.append(False)
                errors[f"Cancel {exc.code().name}: {exc.details()}"] += 1
                return
            reads.append(True)
            answered = status.state
            while status.state not in TERMINAL:
                if time.monotonic() - sent > END_S:
                    never_ended[task_id] = (
                        f"{state_name(status.state)} on {status.agent or '-'} in {status.dc}, "
                        f"attempt {status.attempt}, path {list(status.path)}"
                    )
                    return
                await asyncio.sleep(POLL_S)
                status = await client.get(task_id)
            ended[kind].append(time.monotonic() - sent)
            if answered not in TERMINAL and status.state == pb.TASK_STATE_SUCCEEDED:
                ignored.append(task_id)  # told "not finished", and then it succeeded

    await asyncio.gather(*map(cancel, accepted))
    return {
        "tasks": count,
        "accepted": len(accepted),
        "get_cancel_ok": round(sum(reads) / len(reads), 4) if reads else None,
        "cancel_waiting": _quantiles(ended["waiting"]),
        "cancel_running": _quantiles(ended["running"]),
        "floor_get": _quantiles(gets),
        "errors": dict(errors),
        "cancel_retries": dict(retried),
        "ignored_cancels": sorted(ignored),
        "never_ended": never_ended,
    }


async def _run(addresses: list[str], security: object, count: int, seed: int) -> dict[str, object]:
    clients = [MeshClient(a, security) for a in addresses]  # type: ignore[arg-type]
    try:
        return await measure(clients, count, seed)
    finally:
        for client in clients:
            await client.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench cancel", description=__doc__)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    document = yaml.safe_load(LOCAL.read_text())
    document["prefix"] = "bench-cancel"
    try:
        with local_mesh(document, timeout_s=90) as mesh:
            assert mesh.trust is not None
            addresses = [s.address for s in mesh.started if s.kind == "agent"]
            result = asyncio.run(
                _run(
                    addresses,
                    mesh.trust.user("bench", roles=LOAD_ROLES),
                    args.tasks,
                    args.seed,
                )
            )
    except MeshError as exc:
        raise SystemExit(f"bench cancel: {exc}") from exc
    ignored = result["ignored_cancels"]
    if args.json:
        print(json.dumps(result))
        if ignored:
            raise SystemExit(f"cancels answered unfinished that then succeeded: {ignored}")
        return
    print(
        f"tasks {result['accepted']}/{result['tasks']} accepted; "
        f"Get and Cancel through any agent: {result['get_cancel_ok']:.2%} succeeded"
    )
    print(f"{'cancel → terminal':<20}{'count':>7}{'p50 s':>9}{'p99 s':>9}{'max s':>9}")
    for error, times in result["errors"].items():  # type: ignore[union-attr]
        print(f"  {times} x {error}")
    for name in ("cancel_waiting", "cancel_running", "floor_get"):
        q = result[name]
        assert isinstance(q, dict)
        print(
            f"{name:<20}{q.get('count', 0):>7}{q.get('p50_s', '-'):>9}{q.get('p99_s', '-'):>9}"
            f"{q.get('max_s', '-'):>9}"
        )
    print(f"cancels answered unfinished that then succeeded: {len(ignored)}", *ignored[:10])
    never = result["never_ended"]
    assert isinstance(never, dict)
    for task_id, last in list(never.items())[:10]:
        print(f"cancelled, not ended within {END_S:.0f}s: {task_id}: {last}")
    raise SystemExit(1 if ignored or never else 0)
