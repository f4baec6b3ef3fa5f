"""Result files: written where the agent says, named by no caller."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from mesh.agent.reporting import write_result


@pytest.mark.parametrize("task_id", ["/tmp/pwned-by-offer", "../../etc/passwd", "a/b", "t1"])
def test_a_result_lands_in_the_result_folder_whatever_its_task_id(
    tmp_path: Path, task_id: str
) -> None:
    folder = tmp_path / "results"
    path = write_result(folder, task_id, 1, b"data")
    assert path.parent == folder.resolve() and path.read_bytes() == b"data"
    assert re.fullmatch(r"[0-9a-f]{32}\.1\.[0-9a-f]{8}", path.name)  # a hash, not the id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not Path("/tmp/pwned-by-offer.1").exists()


def test_two_results_of_one_attempt_never_overwrite_each_other(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    first = write_result(folder, "t", 1, b"one")
    second = write_result(folder, "t", 1, b"two")  # same task, same attempt: a new file
    assert first != second and first.read_bytes() == b"one" and second.read_bytes() == b"two"
