"""``python -m sim run [--seeds N | --seed S [--faults I,J]] [--tasks T] [--workers W] [--json]``.

Runs seeds 1..N (or the one seed S), each a whole mesh with a load and a fault schedule
on virtual time, checked by the chaos suite's checker, spread over W processes. For each
failing seed it prints the violations, the history of the tasks they name, and the
command that replays it with the fewest of its faults that still break it (``--faults``
keeps only those of the seed's drawn schedule); then a summary: seeds, violations, seeds
per minute, tasks simulated per second. Exits 1 when a seed fails. ``--keep DIR`` keeps
each seed's history files there.

String hashing is seeded (``PYTHONHASHSEED=0``, set by re-running itself), so a set's
order, and so the history, is the same in every process: a seed replays byte for byte.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from sim import report
from sim.run import drawn, simulate


def one(
    seed: int, tasks: int, keep: Path | None, only: list[int] | None = None
) -> dict[str, object]:
    logging.disable(logging.CRITICAL)  # the agents' logs: the history says what matters
    workdir = keep / f"seed-{seed}" if keep else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    schedule = None if only is None else [drawn(seed, tasks)[i] for i in only]
    outcome = simulate(seed, tasks, workdir, schedule)
    failing = not outcome.ok and only is None
    return {
        "seed": seed,
        "ok": outcome.ok,
        "violations": outcome.verdict.violations,
        "faults": outcome.faults,
        "fewest_faults": report.fewest_faults(seed, tasks) if failing else only,
        "history": report.around(outcome.events, outcome.verdict.violations),
        "accepted": outcome.verdict.accepted,
        "succeeded": outcome.verdict.succeeded,
        "history_sha256": outcome.history_sha256,
        "simulated_s": outcome.simulated_s,
    }


def replay(result: dict[str, object], tasks: int) -> str:
    kept = result["fewest_faults"]
    only = f" --faults {','.join(map(str, kept))}" if kept is not None else ""  # type: ignore[call-overload]
    return f"python -m sim run --seed {result['seed']} --tasks {tasks}{only} --keep DIR"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run"])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seeds", type=int, default=100, help="run seeds 1..N")
    which.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument(
        "--faults", help="with --seed: keep only these of its drawn faults (0-based, I,J)"
    )
    parser.add_argument("--tasks", type=int, default=200, help="tasks the load submits")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", type=Path, help="keep each seed's histories here")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else list(range(1, args.seeds + 1))
    only = None
    if args.faults is not None:
        if args.seed is None:
            parser.error("--faults needs --seed")
        only = [int(i) for i in args.faults.split(",") if i.strip()]
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(seeds)))) as pool:
        n = len(seeds)
        results = list(pool.map(one, seeds, [args.tasks] * n, [args.keep] * n, [only] * n))
    elapsed = time.monotonic() - started
    failed = [r for r in results if not r["ok"]]
    summary = {
        "seeds": len(seeds),
        "tasks_per_seed": args.tasks,
        "violations": [
            {
                "seed": r["seed"],
                "violations": r["violations"],
                "faults": r["faults"],
                "history": r["history"],
                "replay": replay(r, args.tasks),
            }
            for r in failed
        ],
        "seeds_per_min": round(len(seeds) / elapsed * 60, 1),
        "tasks_simulated_per_s": round(len(seeds) * args.tasks / elapsed, 1),
        "seconds": round(elapsed, 1),
    }
    if args.seed is not None:
        summary["history_sha256"] = results[0]["history_sha256"]
    if args.json:
        print(json.dumps(summary))
    else:
        for r in failed:
            print(f"seed {r['seed']} FAILED ({'; '.join(r['faults']) or 'no faults'}):")
            for violation in r["violations"][:10]:
                print(f"  {violation}")
            for event in r["history"]:
                print(f"    {event}")
            print(f"  replay: {replay(r, args.tasks)}")
        print(
            f"{len(seeds)} seeds x {args.tasks} tasks: {len(failed)} failed; "
            f"{summary['seeds_per_min']} seeds/min, {summary['tasks_simulated_per_s']} tasks/s"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # the same hashes, so the same histories
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "sim", *sys.argv[1:]])
    sys.exit(main(sys.argv[1:]))
