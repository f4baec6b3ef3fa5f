"""The decision log: every routing decision as one JSON line, replayable offline.

Each line holds the router's whole view at that moment (policy, members, loads, loaded
models), the request, the agents already visited, the overflow options, and the decision.
``meshctl replay FILE`` rebuilds a router from each line and routes again: the router is
pure, so any difference is a bug (or a changed router), never noise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from mesh.core.router import Router, from_snapshot, snapshot
from mesh.core.routing import Decision, Request, Spill, spill_from_dict, spill_to_dict


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
            "ts": round(time.time(), 3),
            "request": asdict(request),
            "visited": sorted(visited),
            "spill": spill_to_dict(spill),
            "view": snapshot(router),
            "decision": decision.to_dict(),
        }
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
    """Route every logged request again through a router rebuilt from its logged view."""
    with path.open() as f:
        for number, line in enumerate(f, 1):
            entry = json.loads(line)
            router = from_snapshot(entry["view"])
            request = Request(**entry["request"])
            again = router.route(request, entry["visited"], spill_from_dict(entry["spill"]))
            now = json.loads(json.dumps(again.to_dict()))  # the same JSON round trip
            yield Replayed(number, request.task_id, entry["decision"], now)
