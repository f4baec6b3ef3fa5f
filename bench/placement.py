"""``python -m bench placement [--json] [--scenarios zipf,queued]``: placement on a live
local mesh, two scenarios, each with a feature off and on in the same run.

**zipf**: a skewed stream of short tasks over a dozen models, the placement plan off,
then on.

One DC of ``--agents`` agents, one 80 GB GPU each, every model taking ``--model-mb`` of
it (so each agent holds a few models, and the DC holds all of them only if they are
spread well) unless ``--size`` says otherwise for it, a model load of ``--load-s``.
Tasks (``sleep`` of ``--task-s``) ask for model ``m<k>`` with Zipf-skewed ``k`` and go to
a random agent, at ``--rate`` a second. Printed for each run: ``cold_share`` (tasks that
paid a model load), ``ideal_share`` (one load per model the stream asked for), their
ratio, the loads paid after the first ``WARMUP_S`` seconds (before the first plan, every
model's first tasks load it wherever the ring sends them), and the mean and p99
completion (submitted to finished) against the task's own work.

**queued**: tasks of one model submitted one after another through one agent of a DC of
three (2, 2 and 1 GPUs), long ones (6 of 20 s) and short ones (10 of 5 s), work
conservation off, then on. Printed: the makespan beside an omniscient scheduler's (each
task, in order, on the slot where it ends first, paying a load where its model is cold),
the slot-seconds a DC slot stood idle while a task waited, and of those the ones past the
bound work conservation keeps (a slot idle, and a task waiting, for more than ``BOUND_S``
plus a model load, see ``mesh.agent.conserve``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from google.protobuf.timestamp_pb2 import Timestamp

from bench.localdc import one_dc
from mesh.client import MeshClient
from mesh.local.localmesh import LocalMesh
from mesh.v1 import tasks_pb2 as pb

WARMUP_S = 10.0


def zipf_model(rng: random.Random, models: int, skew: float) -> str:
    weights = [1 / (k**skew) for k in range(1, models + 1)]
    return f"m{rng.choices(range(models), weights)[0]}"


async def stream(mesh: LocalMesh, args: argparse.Namespace) -> dict[str, float]:
    agents = [s for s in mesh.started if s.kind == "agent"]
    assert mesh.trust is not None
    security = mesh.trust.user("bench", groups=["bench"])
    clients = [MeshClient(a.address, security) for a in agents]
    rng = random.Random(args.seed)
    ids: list[tuple[MeshClient, str]] = []
    try:
        end = time.monotonic() + args.seconds
        serial = 0
        while time.monotonic() < end:
            client = rng.choice(clients)
            spec = pb.TaskSpec(
                task_id=f"p{serial:05d}",
                pipeline="sleep",
                model=zipf_model(rng, args.models, args.skew),
                task_type=pb.TASK_TYPE_T2I,
            )
            spec.params.update(seconds=str(args.task_s), steps="1")
            await client.submit(spec)
            ids.append((client, spec.task_id))
            serial += 1
            await asyncio.sleep(rng.expovariate(args.rate))
        done = [await ended(client, task_id) for client, task_id in ids]
    finally:
        for client in clients:
            await client.close()
    paid = [s for s in done if json.loads(s.result.inline).get("cold_start", False)]
    cold, asked = len(paid), len({s.spec.model for s in done})
    began = min(s.created_at.ToNanoseconds() for s in done)
    settled = [s for s in paid if s.created_at.ToNanoseconds() - began > WARMUP_S * 1e9]
    took = sorted(
        (s.finished_at.ToNanoseconds() - s.created_at.ToNanoseconds()) / 1e9 for s in done
    )
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    return {
        "tasks": len(done),
        "cold_share": round(cold / len(done), 4),
        "ideal_share": round(asked / len(done), 4),
        "cold_over_ideal": round(cold / asked, 2),
        "cold_after_warmup": len(settled),
        "mean_s": round(sum(took) / len(took), 3),
        "p99_s": round(p99, 3),
        "p99_over_work": round(p99 / args.task_s, 1),
    }


async def ended(client: MeshClient, task_id: str) -> pb.TaskStatus:
    deadline = time.monotonic() + 120
    while (status := await client.get(task_id)).state < pb.TASK_STATE_SUCCEEDED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{task_id} did not end within 120 s")
        await asyncio.sleep(0.2)
    if status.state != pb.TASK_STATE_SUCCEEDED:
        raise RuntimeError(f"{task_id} ended {pb.TaskState.Name(status.state)}")
    return status


QUEUED = {"long": (6, 20.0), "short": (10, 5.0)}  # tasks, seconds each
QUEUED_FLEET = {"w1": 2, "w2": 2, "w3": 1}  # GPUs per agent
BOUND_S = 1.0  # gossip of the idle agent's load, a round of conservation, an offer


async def queued(mesh: LocalMesh, tasks: int, seconds: float, load_s: float) -> dict[str, float]:
    """``tasks`` sleep tasks of ``seconds`` into the first agent, and the figures."""
    entry = next(s for s in mesh.started if s.kind == "agent")
    assert mesh.trust is not None
    client = MeshClient(entry.address, mesh.trust.user("bench", groups=["bench"]))
    try:
        for i in range(tasks):
            spec = pb.TaskSpec(
                task_id=f"q{i:03d}", pipeline="sleep", model="sdxl", task_type=pb.TASK_TYPE_T2I
            )
            spec.params.update(seconds=str(seconds), steps="2")
            await client.submit(spec)
        done = [await ended(client, f"q{i:03d}") for i in range(tasks)]
    finally:
        await client.close()
    return conserved(done, seconds, load_s)


def conserved(done: list[pb.TaskStatus], seconds: float, load_s: float) -> dict[str, float]:
    t0 = min(s.created_at.ToNanoseconds() for s in done)

    def at(ts: Timestamp) -> float:
        return (ts.ToNanoseconds() - t0) / 1e9

    spans = sorted((at(s.created_at), at(s.started_at), at(s.finished_at)) for s in done)
    makespan = max(end for _, _, end in spans)
    ideal = omniscient([c for c, _, _ in spans], seconds, load_s)
    idle = idle_while_queued(spans, sum(QUEUED_FLEET.values()), 0.0)
    beyond = idle_while_queued(spans, sum(QUEUED_FLEET.values()), BOUND_S + load_s)
    return {
        "tasks": len(done),
        "makespan_s": round(makespan, 2),
        "omniscient_s": round(ideal, 2),
        "makespan_over_omniscient": round(makespan / ideal, 2),
        "max_wait_s": round(max(start - created for created, start, _ in spans), 2),
        "idle_slot_s_while_queued": round(idle, 2),
        "beyond_bound_slot_s": round(beyond, 2),
        "agents_used": len({s.agent for s in done}),
    }


def omniscient(arrivals: list[float], seconds: float, load_s: float) -> float:
    """The makespan of tasks arriving at ``arrivals``, each put where it ends first."""
    free = {(agent, slot): 0.0 for agent, gpus in QUEUED_FLEET.items() for slot in range(gpus)}
    warm: set[str] = set()
    end = 0.0
    for arrival in arrivals:

        def finish(key: tuple[str, int], arrival: float = arrival) -> float:
            return max(arrival, free[key]) + seconds + (0.0 if key[0] in warm else load_s)

        key = min(free, key=lambda k: (finish(k), k))
        free[key] = finish(key)
        warm.add(key[0])
        end = max(end, free[key])
    return end


def idle_while_queued(
    spans: list[tuple[float, float, float]], slots: int, grace_s: float, step_s: float = 0.005
) -> float:
    """Slot-seconds a slot stood idle while a task waited, both for more than ``grace_s``
    (0: every idle slot-second while a task waited): the bound says a slot may stay idle
    that long beside a queued task (its load reaches the queue's agent by gossip, a
    round of conservation moves the task), not that a task which waited long must take
    a slot the moment it frees. Sampled every ``step_s`` of the run."""
    end = max(stop for _, _, stop in spans)
    idle = [
        slots - sum(1 for _, start, stop in spans if start <= t < stop)
        for t in (i * step_s for i in range(int(end / step_s) + 1))
    ]
    back = round(grace_s / step_s)
    total = 0.0
    for i in range(back, len(idle)):
        t = i * step_s
        idle_throughout = min(idle[i - back : i + 1])
        waiting = sum(1 for created, start, _ in spans if created + grace_s <= t < start)
        total += step_s * min(max(0, idle_throughout), waiting)
    return total


def run_queued(args: argparse.Namespace, shape: str, conserving: bool) -> dict[str, float]:
    tasks, seconds = QUEUED[shape][0], QUEUED[shape][1] * args.queued_scale
    agents = [{"id": a, "fake_gpus": f"{n}xA100-80GB"} for a, n in QUEUED_FLEET.items()]
    local = {"model_load_s": args.load_s, "work_conserving": conserving, "decision_log": False}
    with one_dc("bench-queued", agents, 90, **local) as mesh:
        return asyncio.run(queued(mesh, tasks, seconds, args.load_s))


def run(args: argparse.Namespace, plan: bool) -> dict[str, float]:
    agents = [{"id": f"pl{i}", "fake_gpus": "1xA100-80GB"} for i in range(args.agents)]
    local = {
        "decision_log": False,
        "model_load_s": args.load_s,
        "model_memory_mb": args.model_mb,
        "model_sizes_mb": dict(args.size),
        "placement_plan": plan,
        "plan_interval_s": 1.0,
    }
    with one_dc("bench-placement", agents, 90, **local) as mesh:
        return asyncio.run(stream(mesh, args))


def sized(text: str) -> tuple[str, int]:
    model, _, mb = text.partition("=")
    if not model or not mb.isdigit():
        raise argparse.ArgumentTypeError(f"expected MODEL=MB, got {text!r}")
    return model, int(mb)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench placement", description=__doc__)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--models", type=int, default=12)
    parser.add_argument("--skew", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--model-mb", type=int, default=20_000, help="each model's memory")
    parser.add_argument(
        "--size",
        type=sized,
        action="append",
        default=[],
        metavar="MODEL=MB",
        help="one model's memory, unlike the rest's (e.g. m0=60000: the hottest takes 3/4 GPU)",
    )
    parser.add_argument("--load-s", type=float, default=0.5, help="a model load")
    parser.add_argument("--task-s", type=float, default=0.2, help="a task's own work")
    parser.add_argument("--rate", type=float, default=8.0, help="tasks a second")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", default="zipf,queued", help="zipf, queued or both")
    parser.add_argument(
        "--queued-scale", type=float, default=1.0, help="queued: times each task's seconds"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    scenarios = set(args.scenarios.split(","))
    result: dict[str, dict] = {}
    if "zipf" in scenarios:
        result |= {"plan_off": run(args, plan=False), "plan_on": run(args, plan=True)}
    if "queued" in scenarios:
        for shape in QUEUED:
            result[f"queued_{shape}"] = {
                "conserving_off": run_queued(args, shape, conserving=False),
                "conserving_on": run_queued(args, shape, conserving=True),
            }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, found in result.items():
        if name.startswith("queued_"):
            for mode, figures in found.items():
                print(f"{name} {mode:14} " + "  ".join(f"{k} {v}" for k, v in figures.items()))
        else:
            print(f"{name:8} " + "  ".join(f"{k} {v}" for k, v in found.items()))
