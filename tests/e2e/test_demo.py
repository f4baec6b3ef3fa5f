"""The main job, small: a 2-DC local mesh from a topology file, a workload, a clean exit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from support import ROOT

from mesh.local.localmesh import free_port, read_state
from mesh.topology import load

CONSOLE_URL = r"console \(while the demo runs\): https://127\.0\.0\.1:\d+/ui/#token=\S{40,}"
SHIPPED = ROOT / "topology" / "local.yaml"


def test_demo_runs_every_task_to_an_end_and_cleans_up(tmp_path: Path) -> None:
    topology = yaml.safe_load(SHIPPED.read_text())
    for dc in topology["dcs"].values():
        dc["etcd"] = [f"127.0.0.1:{free_port()}"]  # never the ports of a mesh left running
    topology["local"]["model_load_s"] = 0.1
    for agents in topology["local"]["agents"].values():
        del agents[2:]
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    load(path)  # still a valid topology
    home = tmp_path / "home"
    meshctl = [sys.executable, "-m", "mesh.cli"]
    try:
        done = subprocess.run(
            [*meshctl, "demo", "--topology", str(path), "--home", str(home),
             "--tasks", "40", "--seed", "3"],
            capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # the demo was killed: its agents were not
        subprocess.run([*meshctl, "down", "--home", str(home)], timeout=60, check=False)
        raise
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every task reached a terminal state" in done.stdout
    assert re.search(CONSOLE_URL, done.stdout), "no console URL with a token"
    assert "where tasks ran" in done.stdout and "west-1" in done.stdout
    assert read_state(home) == []  # torn down: the state file is gone
    assert _processes_mentioning(str(home)) == []  # and so are its etcds and agents


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found
