"""Real agent processes for integration tests, and polling helpers that never assert time.

An agent listens on port 0 and the test reads the address it bound from its "agent ready"
log line, so no two tests race for a port. Every process started here is killed when its
test ends, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mesh.v1 import tasks_pb2 as pb

T = TypeVar("T")


def sleep_spec(
    task_id: str,
    *,
    seconds: float,
    steps: int,
    model: str,
    user: pb.User | None = None,
    **fields: object,
) -> pb.TaskSpec:
    """A task for the ``sleep`` pipeline: the simulated GPU work most tests submit."""
    spec = pb.TaskSpec(
        task_id=task_id,
        user=user or pb.User(id="ada"),
        task_type=pb.TASK_TYPE_T2I,
        pipeline="sleep",
        model=model,
        **fields,  # type: ignore[arg-type]
    )
    spec.params.update(seconds=str(seconds), steps=str(steps))
    return spec


START_TIMEOUT_S = 30.0


@dataclass
class AgentProc:
    agent_id: str
    dc: str
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.process.wait(timeout_s)


@dataclass
class Cluster:
    """Agents of one mesh (one key prefix) on one etcd."""

    etcd_endpoint: str
    prefix: str
    workdir: Path
    agents: list[AgentProc] = field(default_factory=list)

    def argv(self, agent_id: str, dc: str, **flags: object) -> list[str]:
        options: dict[str, object] = {
            "agent_id": agent_id,
            "dc": dc,
            "prefix": self.prefix,
            "etcd_endpoints": json.dumps([self.etcd_endpoint]),
            "listen": "127.0.0.1:0",
            "fake_gpus": "1xA100-80GB",
            "lease_ttl_s": 2,
            "model_load_s": 0,
            "drain_grace_s": 0,
            "result_dir": self.workdir / "results",
            **flags,
        }
        argv = [sys.executable, "-m", "mesh.agent.main"]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv

    def start(self, agent_id: str, dc: str = "west", **flags: object) -> AgentProc:
        """Start an agent and return once it serves; fail with its log if it cannot."""
        log_path = self.workdir / f"{agent_id}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                self.argv(agent_id, dc, **flags),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = AgentProc(agent_id, dc, process, log_path)
        self.agents.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not proc.address:
            for line in proc.log().splitlines():
                if line.startswith("{") and json.loads(line).get("msg") == "agent ready":
                    proc.address = json.loads(line)["address"]
            if proc.process.poll() is not None:
                raise AssertionError(f"agent {agent_id} exited at start:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent {agent_id} not ready:\n{proc.log_tail()}")
            time.sleep(0.05)
        return proc

    def kill_all(self) -> None:
        for proc in self.agents:
            if proc.process.poll() is None:
                os.killpg(proc.process.pid, signal.SIGKILL)
            proc.process.wait()


async def eventually(
    probe: Callable[[], Awaitable[T] | T], *, timeout_s: float = 20.0, what: str = "condition"
) -> T:
    """Poll ``probe`` (plain or async) until it returns something truthy, and return that.

    The timeout is a hang guard, not a measurement: tests wait on conditions, never on
    fixed sleeps, and assert on outcomes, never on how long they took.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value {value!r}")
        await asyncio.sleep(0.05)


async def until_peers(address: str, expected: list[str]) -> None:
    """Wait until the agent at ``address`` sees exactly ``expected`` as its DC's agents."""
    from mesh.client import MeshClient

    async with MeshClient(address) as client:

        async def seen() -> bool:
            return sorted(a.agent_id for a in await client.agents()) == sorted(expected)

        await eventually(seen, what=f"{address} to see {expected}")


def wait_log(proc: AgentProc, text: str, timeout_s: float = 20.0) -> None:
    """Wait until ``text`` appears in the agent's log (a hang guard, not a measurement)."""
    deadline = time.monotonic() + timeout_s
    while text not in proc.log():
        if proc.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{proc.agent_id} never logged {text!r}:\n{proc.log_tail()}")
        time.sleep(0.05)
