"""The fleet rehearsal, as CI runs it: three namespace hosts from ``deploy/`` as written
(the systemd unit's ExecStart, Environment, LoadCredential and Type=notify; agent.yaml),
one host killed while tasks run, and every task still succeeds."""

from __future__ import annotations

import json
import subprocess
import sys

from support import ROOT

from deploy.rehearse import unit_service


def test_the_unit_is_read_as_systemd_reads_it() -> None:
    unit = unit_service((ROOT / "deploy" / "mesh-agent.service").read_text())
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == ["/opt/gpumesh/bin/mesh-agent --config /etc/gpumesh/agent.yaml"]
    assert [c.partition(":")[0] for c in unit["LoadCredential"]] == ["agent.key", "gossip.keys"]
    assert "MESH_TLS_KEY=%d/agent.key" in unit["Environment"]


def test_a_fleet_from_the_deploy_files_loses_no_task_when_a_host_dies() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deploy.rehearse", "--tasks", "12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,  # the rehearsal bounds itself; this is a hang guard
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mid-task" in done.stdout
    summary = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert summary["states"] == {"SUCCEEDED": 12}
    assert summary["reran_after_the_kill"] >= 1  # what the dead host ran, ran again
