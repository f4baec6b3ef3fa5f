"""meshctl against a real agent, and mesh-agent's refusal of a bad configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import typer
import yaml
from support import Cluster
from typer.testing import CliRunner

from mesh.cli import app, lift_credentials

runner = CliRunner()


def meshctl(cluster: Cluster, address: str, *args: str) -> tuple[int, str]:
    """``meshctl`` as the tests' user, with a token, against the agent's API port."""
    result = runner.invoke(app, [*cluster.cli_user(), *args, "--endpoint", address])
    return result.exit_code, result.output


def test_meshctl_verbs(cluster: Cluster) -> None:
    agent = cluster.start("cli", fake_gpus="2xL40S-48GB")
    code, out = meshctl(cluster, agent.address, "agents", "-o", "json")
    assert code == 0, out
    assert [a["agent_id"] for a in json.loads(out)] == ["cli"]

    code, out = meshctl(
        cluster, agent.address, "submit", "--pipeline", "sleep", "--model", "sdxl", "--type", "t2i",
        "--id", "c1", "-p", "seconds=0", "-p", "steps=2", "--wait", "-o", "json",
    )  # fmt: skip
    assert code == 0, out
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["status"]["state"] == "TASK_STATE_SUCCEEDED"

    code, out = meshctl(cluster, agent.address, "get", "c1", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["agent"] == "cli"
    code, out = meshctl(cluster, agent.address, "list", "--state", "succeeded", "-o", "json")
    assert code == 0 and [t["task_id"] for t in json.loads(out)["tasks"]] == ["c1"]
    code, out = meshctl(cluster, agent.address, "get", "c1")
    assert code == 0 and "c1" in out and "cli" in out  # the table
    code, out = meshctl(
        cluster, agent.address, "rerun", "c1", "--id", "c1b", "--wait", "-o", "json"
    )
    assert code == 0, out
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["status"]["spec"]["rerun_of"] == "c1"
    assert events[-1]["status"]["state"] == "TASK_STATE_SUCCEEDED"

    code, out = meshctl(
        cluster, agent.address, "submit", "--pipeline", "sleep", "--model", "sdxl", "--id", "c2",
        "-p", "seconds=300",
    )  # fmt: skip
    assert code == 0, out
    code, out = meshctl(cluster, agent.address, "cancel", "c2", "--reason", "test", "-o", "json")
    assert code == 0 and json.loads(out)["error"]["message"] == "test"


def test_meshctl_reports_errors_in_one_line(cluster: Cluster) -> None:
    agent = cluster.start("cli")
    code, out = meshctl(cluster, agent.address, "get", "missing")
    assert code == 1 and "NOT_FOUND" in out and "Traceback" not in out
    code, out = meshctl(cluster, agent.address, "submit", "--pipeline", "paint", "--model", "m")
    assert code == 1 and "INVALID_ARGUMENT" in out and "unknown pipeline" in out
    code, out = meshctl(
cluster, agent.address, "submit", "--pipeline", "sleep", "--model", "m",
                        "--type", "video")  # fmt: skip
    assert code == 2 and "unknown --type" in out
    code, out = meshctl(cluster, agent.address, "list", "--state", "sleepy")
    assert code == 2 and "unknown --state" in out


def test_agent_refuses_bad_config_before_listening() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mesh.agent.main", "--lease-ttl-s", "0", "--fake-gpus", "2xB"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "lease_ttl_s" in done.stderr and "Traceback" not in done.stderr


def test_agent_refuses_a_bad_inventory(cluster: Cluster) -> None:
    argv = cluster.argv("bad", "west", fake_gpus="2xH1OO-80GB")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown GPU class 'H1OO'" in done.stderr


def test_agent_without_etcd_exits_with_a_reason(cluster: Cluster) -> None:
    argv = cluster.argv("lonely", "west", etcd_endpoints='["127.0.0.1:1"]')
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot start" in done.stderr and "Traceback" not in done.stderr


def test_tables_are_not_cut_to_80_columns_when_piped() -> None:
    """A table printed into a pipe or a CI log keeps every header whole."""
    headers = [f"a-rather-long-header-{i}" for i in range(8)]  # ~200 columns
    program = (
        "from rich.table import Table\n"
        "from mesh.cli.common import console\n"
        f"console.print(Table(*{headers!r}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert all(h in out for h in headers), out


def test_credentials_are_taken_before_or_after_the_command() -> None:
    """``meshctl queue --ca X`` failed where ``meshctl --ca X queue`` worked: credentials
    given after the command move before it; a command's own option of that name stays."""
    group = typer.main.get_command(app)
    after = ["queue", "--ca", "ca.crt", "--token=T", "-e", "h:1", "--insecure"]
    assert lift_credentials(group, after) == [
        "--ca", "ca.crt", "--token=T", "--insecure", "queue", "-e", "h:1",
    ]  # fmt: skip
    before = ["--ca", "ca.crt", "list", "--state", "running"]
    assert lift_credentials(group, before) == before
    own = ["pki", "issue", "user", "--name", "bob", "--mesh", "m"]
    assert lift_credentials(group, own) == own  # pki issue has a --mesh of its own
    assert lift_credentials(group, ["nonsense", "--ca", "x"]) == ["nonsense", "--ca", "x"]
