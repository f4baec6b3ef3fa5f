"""``python -m bench globalcap [--json]``: how far a global cap split among DCs
(``mesh.core.tenants.global_share``) can over-admit, measured in a simulation.

Each DC holds its group to its part of the cap exactly (etcd slots), so the parts can only
add up to more than the cap when DCs compute them from different views of each other's
slots: a DC learns another's slots from its summary, which lags (``--lag`` seconds). And a
part that shrinks takes nothing back: runs under way finish (at most a run's length).
The simulation saturates the group in every DC (it always has work waiting), makes the
DCs' slot counts change (agents join, leave, drain: a random walk, one change per DC
every few seconds), and measures each tick the GPUs the group holds across DCs against
the cap. Printed: the worst over-admission in GPUs and as a part of the cap, how much of
the time the cap was passed at all, and the same with no lag (only the shrinking parts).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field

from mesh.core.tenants import global_share

TICK_S = 0.1


@dataclass
class Dc:
    name: str
    slots: int
    runs: list[float] = field(default_factory=list)  # when each run under way ends


def simulate(
    dcs: int,
    cap: int,
    lag_s: float,
    run_s: float,
    change_s: float,
    minutes: float,
    seed: int,
    held_too: bool,
) -> dict[str, float]:
    rng = random.Random(seed)
    fleet = [Dc(f"dc{i}", rng.randint(20, 60)) for i in range(dcs)]
    history: list[tuple[float, dict[str, tuple[int, int]]]] = []  # DCs' slots and held
    worst, over_ticks, ticks = 0, 0, 0
    now = 0.0
    while now < minutes * 60:
        for dc in fleet:
            if rng.random() < TICK_S / change_s:
                dc.slots = max(1, dc.slots + rng.choice([-8, -4, -1, 1, 4, 8]))
        for dc in fleet:
            dc.runs = [end for end in dc.runs if end > now]
        history.append((now, {dc.name: (dc.slots, len(dc.runs)) for dc in fleet}))
        seen = next((s for t, s in reversed(history) if t <= now - lag_s), history[0][1])
        for dc in fleet:
            # its own slots now, the others' slots (and GPUs held) as their summaries said
            view = {name: slots for name, (slots, _) in seen.items()} | {dc.name: dc.slots}
            part = min(global_share(cap, dc.name, view), dc.slots)
            if held_too:
                others = sum(held for name, (_, held) in seen.items() if name != dc.name)
                part = min(part, cap - others)
            while len(dc.runs) < part:  # saturated: a run starts on every free part
                dc.runs.append(now + rng.uniform(0.5, 1.5) * run_s)
        held = sum(len(dc.runs) for dc in fleet)
        worst = max(worst, held - cap)
        over_ticks += held > cap
        ticks += 1
        now += TICK_S
    return {
        "over_admission_max_gpus": max(0, worst),
        "over_admission_max_share": round(max(0, worst) / cap, 4),
        "time_over_cap_share": round(over_ticks / ticks, 4),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    knobs = {
        "dcs": args.dcs, "cap": args.cap, "run_s": args.run_s, "change_s": args.change_s,
        "minutes": args.minutes, "seed": args.seed,
    }  # fmt: skip
    return {
        **knobs,
        "lag_s": args.lag,
        "parts_only": simulate(lag_s=args.lag, held_too=False, **knobs),
        "parts_and_held": simulate(lag_s=args.lag, held_too=True, **knobs),
        "parts_and_held_no_lag": simulate(lag_s=0.0, held_too=True, **knobs),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench globalcap", description=__doc__)
    parser.add_argument("--dcs", type=int, default=3)
    parser.add_argument("--cap", type=int, default=40, help="the group's global cap, GPUs")
    parser.add_argument("--lag", type=float, default=2.0, help="summary lag, seconds")
    parser.add_argument("--run-s", type=float, default=30.0, help="mean run length")
    parser.add_argument(
        "--change-s", type=float, default=10.0, help="mean time between a DC's slot changes"
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in ("parts_only", "parts_and_held", "parts_and_held_no_lag"):
        found = result[name]
        assert isinstance(found, dict)
        print(
            f"{name:21} worst over the cap: {found['over_admission_max_gpus']} GPUs "
            f"({found['over_admission_max_share']:.1%} of {args.cap}); "
            f"over the cap {found['time_over_cap_share']:.1%} of the time"
        )
