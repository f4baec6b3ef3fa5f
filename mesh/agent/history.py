"""An append-only history of what this agent did to tasks, for the chaos checker.

Each line is one JSON event: an operation (``run``, ``commit``, ``owner``, ``claim``,
``requeue``, ``lease``), its phase, the task, attempt and fencing token it concerned, the
etcd revision it produced, and ``time.monotonic()``. Every process on one machine reads
the same monotonic clock, so the histories of agents, clients and the fault schedule
merge into one timeline without trusting wall clocks. Unset, nothing is written and each
call costs one attribute check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from mesh.core import clock


class History:
    def __init__(self, path: Path | None, agent: str, dc: str) -> None:
        self._agent = agent
        self._dc = dc
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)  # a line at a time: a SIGKILL loses none

    def write(self, op: str, phase: str, **fields: object) -> None:
        if self._file is None:
            return
        event = {"op": op, "phase": phase, "agent": self._agent, "dc": self._dc}
        event.update({k: v for k, v in fields.items() if v is not None})
        event["mono"] = clock.monotonic()
        self._file.write(json.dumps(event, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
