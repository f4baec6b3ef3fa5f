"""``python -m bench layers [--json]``: splitting a model's layers over agents, greedy and
dynamic programming (``mesh.core.layers``) against the optimum, on small random cases.

Each case: a model of 16 to 64 layers (each 0.5 to 3 GB, compute in proportion with some
noise) and 2 to 5 agents of mixed GPU classes with part of their memory free. The optimum
tries every order of the agents, which is why the fleets are small. Printed: how often
each allocator finds a split that fits, and its slowest stage over the optimum's (mean,
p95, worst), with the time each takes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence

from mesh.core.layers import Device, Split, balanced, greedy, optimum
from mesh.gpus import DEFAULT_GPU_WEIGHTS

CLASSES = [("H100", 80_000), ("A100", 80_000), ("L40S", 48_000), ("A40", 48_000)]
Allocator = Callable[[Sequence[int], Sequence[float], Sequence[Device]], Split]


def case(rng: random.Random) -> tuple[list[int], list[float], list[Device]]:
    layers = rng.randint(16, 64)
    memory = [rng.randint(500, 3000) for _ in range(layers)]
    compute = [m / 1000 * rng.uniform(0.8, 1.2) for m in memory]
    devices = []
    for i in range(rng.randint(2, 5)):
        cls, total = rng.choice(CLASSES)
        free = int(total * rng.uniform(0.2, 0.9))
        devices.append(Device(f"gpu-{i}", free, DEFAULT_GPU_WEIGHTS[cls]))
    return memory, compute, devices


def run(cases: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    allocators: dict[str, Allocator] = {"greedy": greedy, "dp": balanced}
    ratios: dict[str, list[float]] = {name: [] for name in allocators}
    fits = dict.fromkeys(allocators, 0)
    spent = dict.fromkeys([*allocators, "optimum"], 0.0)
    feasible = 0
    for _ in range(cases):
        memory, compute, devices = case(rng)
        started = time.perf_counter()
        best = optimum(memory, compute, devices)
        spent["optimum"] += time.perf_counter() - started
        if not best.fits:
            continue
        feasible += 1
        for name, allocate in allocators.items():
            started = time.perf_counter()
            split = allocate(memory, compute, devices)
            spent[name] += time.perf_counter() - started
            if split.fits:
                fits[name] += 1
                ratios[name].append(split.bottleneck_s / best.bottleneck_s)
    out: dict[str, object] = {"cases": cases, "feasible": feasible}
    for name, found in ratios.items():
        found.sort()
        out[name] = {
            "fit_share": round(fits[name] / max(1, feasible), 4),
            "mean_over_optimum": round(statistics.fmean(found), 4) if found else None,
            "p95_over_optimum": round(found[int(len(found) * 0.95)], 4) if found else None,
            "worst_over_optimum": round(found[-1], 4) if found else None,
            "ms_per_case": round(1000 * spent[name] / max(1, cases), 3),
        }
    out["optimum_ms_per_case"] = round(1000 * spent["optimum"] / max(1, cases), 3)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench layers", description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.cases, args.seed)
    if args.json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    title = f"layer splits on {result['feasible']} feasible cases of {result['cases']}"
    columns = ("allocator", "fits", "mean / optimum", "p95 / optimum", "worst", "ms per case")
    table = Table(*columns, title=title)
    for name in ("greedy", "dp"):
        row = result[name]
        assert isinstance(row, dict)
        table.add_row(
            name,
            f"{row['fit_share']:.1%}",
            *(str(row[k]) for k in ("mean_over_optimum", "p95_over_optimum", "worst_over_optimum")),
            str(row["ms_per_case"]),
        )
    Console().print(table)
    print(f"optimum (every order of the agents): {result['optimum_ms_per_case']} ms per case")
