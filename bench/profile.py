"""Where a bench's processes spend their CPU: py-spy sampling each one, and the top costs.

``Profiles`` starts ``py-spy record`` on each process given (the agents, the bench's own
client) for as long as the ``with`` lasts, writing collapsed stacks (``--format raw``: one
line per distinct stack, its frames joined by ``;``, then its sample count). ``top`` reads
one such file back as the functions the samples were in (self time: the innermost frame,
where the CPU was), grouped by function and file, each with its share of the samples: the
table the README keeps before and after each change to the hot path. py-spy reads the
processes' memory from outside (ptrace), so the profiled code is not changed; it needs the
right to trace them (root here, or ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

RATE_HZ = 200


class Profiles:
    def __init__(self, folder: Path, pids: dict[str, int]) -> None:
        """``pids``: the processes to sample, by the name their file takes."""
        self.folder = folder
        self._pids = pids
        self._spies: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Profiles:
        spy = shutil.which("py-spy")
        if spy is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, pid in self._pids.items():
            command = [spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format"]
            command += ["raw", "--nonblocking", "--output", str(self.folder / f"{name}.txt")]
            self._spies.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for spy in self._spies:  # SIGINT: py-spy writes what it sampled, then exits
            spy.send_signal(signal.SIGINT)
        for spy in self._spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()

    def tops(self, n: int = 10) -> dict[str, list[tuple[str, float]]]:
        return {
            name: top(path, n)
            for name in self._pids
            if (path := self.folder / f"{name}.txt").exists()
        }


def top(path: Path, n: int = 10) -> list[tuple[str, float]]:
    """The ``n`` functions most samples of ``path`` were in, each with its share (0-1)."""
    samples: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples[_function(stack.rsplit(";", 1)[-1])] += int(count)
    total = sum(samples.values()) or 1
    return [(name, round(count / total, 3)) for name, count in samples.most_common(n)]


def _function(frame: str) -> str:
    """``name (path/to/file.py:LINE)`` as ``name (file.py)``: one entry per function,
    whatever line of it was running, and short enough for a table."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    with contextlib.suppress(ValueError):
        file = file[file.rindex("/") + 1 :]
    return f"{name} ({file})" if file else name


@contextlib.contextmanager
def maybe(folder: Path | None, pids: dict[str, int]) -> Iterator[Profiles | None]:
    """``Profiles`` over ``pids`` when ``folder`` is given, else nothing."""
    if folder is None:
        yield None
        return
    with Profiles(folder, pids) as profiles:
        yield profiles
