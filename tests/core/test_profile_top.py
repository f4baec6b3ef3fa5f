"""``bench.profile.top``: py-spy's collapsed stacks read back as the costliest functions."""

from __future__ import annotations

from pathlib import Path

from bench.profile import top

RAW = """\
<module> (/x/run.py:3);main (/x/run.py:9);submit (/work/mesh/agent/taskapi.py:58) 6
<module> (/x/run.py:3);main (/x/run.py:9);submit (/work/mesh/agent/taskapi.py:61) 2
<module> (/x/run.py:3);main (/x/run.py:9);encode (/work/mesh/gossip/wire.py:40) 2
a line py-spy never writes
"""


def test_self_time_is_the_innermost_frame_per_function_whatever_its_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.txt"
    path.write_text(RAW)
    assert top(path) == [("submit (taskapi.py)", 0.8), ("encode (wire.py)", 0.2)]
    assert top(path, 1) == [("submit (taskapi.py)", 0.8)]
