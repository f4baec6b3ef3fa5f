"""The decision log: every routing, quota, preemption and placement-plan decision as one
JSON line, replayable offline.

A routing line holds the router's whole view at that moment (policy, members, loads, loaded
models), the request, the agents already visited, the overflow options, and the decision.
A ``quota`` line holds a task's caps and the GPUs held against them, and whether it must
wait; a ``preempt`` line the runs an online task found, its need, the agent's slots and
online share, and the batch runs it preempted; a ``plan`` line the demand per model, the
agents as the planner saw them and the previous plan, and the homes it gave each model.
``meshctl replay FILE`` decides each line again with the pure core (``Router.route``,
``tenants.verdict``, ``preemption.victims``, ``planner.plan``): any difference is a bug (or a
changed core), never noise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from mesh.core import clock
from mesh.core.planner import Host, Plan, plan
from mesh.core.preemption import Run, victims
from mesh.core.router import Router, from_snapshot, snapshot
from mesh.core.routing import Decision, Request, Spill, spill_from_dict, spill_to_dict
from mesh.core.tenants import Cap, Judged, Spend, verdict


class DecisionLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", buffering=1)  # line-buffered: whole lines

    def write(
        self,
        router: Router,
        request: Request,
        visited: Iterable[str],
        spill: Spill,
        decision: Decision,
    ) -> None:
        entry = {
            "ts": round(clock.now(), 3),
            "request": asdict(request),
            "visited": sorted(visited),
            "spill": spill_to_dict(spill),
            "view": snapshot(router),
            "decision": decision.to_dict(),
        }
        self._line(entry)

    def quota(self, task_id: str, gpus: int, judged: Judged) -> None:
        self._line(
            {
                "kind": "quota",
                "ts": round(clock.now(), 3),
                "request": {"task_id": task_id, "gpus": gpus},
                "caps": [list(cap) for cap in judged.caps],
                "held": [[scope, name, n] for (scope, name), n in sorted(judged.held.items())],
                "budgets": [list(budget) for budget in judged.budgets],
                "used": [[scope, name, s] for (scope, name), s in sorted(judged.used.items())],
                "now_s": judged.now_s,
                "decision": {"wait": judged.reason},
            }
        )

    def preempt(
        self, task_id: str, runs: Sequence[Run], free: int, need: int, slots: int,
        online_share: float, shares: Mapping[str, float], chosen: list[str],
    ) -> None:  # fmt: skip
        self._line(
            {
                "kind": "preempt",
                "ts": round(clock.now(), 3),
                "request": {"task_id": task_id, "need": need, "free": free},
                "runs": [asdict(run) for run in runs],
                "slots": slots,
                "online_share": online_share,
                "shares": dict(shares),
                "decision": {"victims": chosen},
            }
        )

    def plan(
        self,
        demand: Mapping[str, float],
        hosts: Sequence[Host],
        previous: Plan | None,
        made: Plan,
        sizes: Mapping[str, int],
    ) -> None:
        self._line(
            {
                "kind": "plan",
                "ts": round(clock.now(), 3),
                "request": {
                    "task_id": "",
                    "demand": dict(sorted(demand.items())),
                    "sizes": dict(sorted(sizes.items())),
                },
                "hosts": [
                    {"name": h.name, "weight": h.weight, "room": h.room, "loaded": sorted(h.loaded)}
                    for h in hosts
                ],
                "previous": {m: list(a) for m, a in (previous.homes if previous else {}).items()},
                "decision": {"homes": {m: list(a) for m, a in made.homes.items()}},
            }
        )

    def _line(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class Replayed:
    line: int
    task_id: str
    logged: dict[str, Any]
    now: dict[str, Any]

    @property
    def same(self) -> bool:
        return self.logged == self.now


def replay(path: Path) -> Iterator[Replayed]:
    """Decide every logged line again: route through a router rebuilt from its logged
    view, judge quota and preemption with the pure functions that decided them."""
    with path.open() as f:
        for number, line in enumerate(f, 1):
            entry = json.loads(line)
            kind = entry.get("kind", "route")
            now = REPLAY[kind](entry)
            task_id = entry["request"]["task_id"]
            yield Replayed(number, task_id, entry["decision"], json.loads(json.dumps(now)))


def _route(entry: dict[str, Any]) -> dict[str, Any]:
    router = from_snapshot(entry["view"])
    request = Request(**entry["request"])
    return router.route(request, entry["visited"], spill_from_dict(entry["spill"])).to_dict()


def _quota(entry: dict[str, Any]) -> dict[str, Any]:
    caps = [Cap(*cap) for cap in entry["caps"]]
    held = {(scope, name): n for scope, name, n in entry["held"]}
    budgets = [Spend(*budget) for budget in entry.get("budgets", [])]
    used = {(scope, name): s for scope, name, s in entry.get("used", [])}
    now_s = entry.get("now_s", 0.0)
    return {"wait": verdict(caps, held, entry["request"]["gpus"], budgets, used, now_s)}


def _preempt(entry: dict[str, Any]) -> dict[str, Any]:
    runs = [Run(**run) for run in entry["runs"]]
    request = entry["request"]
    chosen = victims(
        runs,
        request["free"],
        request["need"],
        entry["slots"],
        entry["online_share"],
        entry.get("shares", {}),
    )
    return {"victims": chosen}


def _plan(entry: dict[str, Any]) -> dict[str, Any]:
    hosts = [
        Host(h["name"], h["weight"], h["room"], frozenset(h["loaded"])) for h in entry["hosts"]
    ]
    previous = Plan({m: tuple(a) for m, a in entry["previous"].items()})
    request = entry["request"]
    made = plan(request["demand"], hosts, previous, request.get("sizes"))
    return {"homes": {m: list(a) for m, a in made.homes.items()}}


REPLAY = {"route": _route, "quota": _quota, "preempt": _preempt, "plan": _plan}
