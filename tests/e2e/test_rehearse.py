"""The fleet rehearsals, as CI runs them: three namespace hosts from ``deploy/`` as written
(the systemd unit's ExecStart, Environment, LoadCredential and Type=notify; agent.yaml),
and the compose fleet in containers; in each, one host or agent killed while tasks run,
and every task still succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import ROOT

from deploy.containers import PROJECT
from deploy.engine import LABEL, Engine
from deploy.image import AGENT_TAG
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


def test_the_compose_fleet_runs_from_the_deploy_files(engine: Engine) -> None:
    """``deploy/compose.yaml`` and ``deploy/Dockerfile`` as written, on a real engine: the
    image built from host wheels on a base made without a registry, the PKI made by its
    one-shot container, 3 etcd members with TLS and RBAC, 3 agents; an agent container
    killed mid-task; every task succeeds, and nothing of the fleet is left."""
    done = subprocess.run(
        [sys.executable, "-m", "deploy.rehearse", "--containers", "--tasks", "6", "--json"],
        cwd=ROOT,
        env={**os.environ, "DOCKER_HOST": engine.url},
        capture_output=True,
        text=True,
        timeout=480,  # image, base and fleet bound themselves; this is a hang guard
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(done.stdout.splitlines()[-1])
    assert (figures["succeeded"], figures["lost"]) == (6, 0)
    assert figures["reran"] >= 1  # what the killed agent ran, ran again
    assert figures["left_behind"] == [] and engine.leftovers(PROJECT) == []
    # What a container of the image gets (podman's API leaves the healthcheck out of the
    # image's own inspection, not out of its containers).
    container = engine.client.containers.create(AGENT_TAG, labels={LABEL: PROJECT})
    try:
        config = container.attrs["Config"]
    finally:
        engine.remove(container)
    assert config["User"] == "1000:1000"  # not root
    assert config["Healthcheck"]["Test"][-3:] == ["python", "-m", "mesh.agent.probe"]
