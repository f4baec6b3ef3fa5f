"""Real agent processes for integration tests, and polling helpers that never assert time.

An agent listens on port 0 (both its API and its mTLS port) and the test reads the
addresses it bound from its "agent ready" log line, so no two tests race for a port.
Every agent runs with its own certificate and the mesh's gossip key; tests reach it as
user "ada" with a token (``proc.client()``). Every process started here is killed when
its test ends, whatever the outcome.
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

import grpc

from mesh.channels import Security, open_channel
from mesh.client import MeshClient
from mesh.config import AgentConfig
from mesh.core.access import OPERATOR
from mesh.local.etcdserver import EtcdMember
from mesh.local.localmesh import LOCAL_HOSTS
from mesh.local.trust import LocalTrust
from mesh.store import topostore
from mesh.topology import parse
from mesh.trust.pki import write_secret
from mesh.v1 import tasks_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent  # the repository

T = TypeVar("T")
DCS = ("west", "east", "north", "local")  # the DCs tests name: each test's grants cover them
USER = "ada"  # who the tests are: an operator, who may also submit and read
GROUPS = ["research"]


def config(**fields: object) -> AgentConfig:
    """An agent's configuration for tests that start no agent: valid as a secure
    agent's (TLS files named, never read here; a gossip key), with ``fields`` on top."""
    secure: dict[str, object] = {
        "tls_ca": "ca.crt",
        "tls_cert": "agent.crt",
        "tls_key": "agent.key",
        "gossip_keys": ["a test gossip key of some length"],
    }
    return AgentConfig(**{**secure, **fields})  # type: ignore[arg-type]


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
    security: Security
    address: str = ""
    peer_address: str = ""
    http_url: str = ""

    def client(self, security: Security | None = None) -> MeshClient:
        """A client of this agent's API port, as the tests' user (or ``security``)."""
        return MeshClient(self.address, security or self.security)

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
    trust: LocalTrust
    agents: list[AgentProc] = field(default_factory=list)

    @property
    def security(self) -> Security:
        return self.trust.user(USER, groups=GROUPS, roles=[OPERATOR])

    def argv(self, agent_id: str, dc: str, **flags: object) -> list[str]:
        options: dict[str, object] = {
            "agent_id": agent_id,
            "dc": dc,
            "prefix": self.prefix,
            "etcd_endpoints": json.dumps([self.etcd_endpoint]),
            "listen": "127.0.0.1:0",
            "peer_listen": "127.0.0.1:0",
            "fake_gpus": "1xA100-80GB",
            "lease_ttl_s": 2,
            "model_load_s": 0,
            "drain_grace_s": 0,
            "drain_notice_s": 0.3,
            "result_dir": self.workdir / "results",
            "gossip_key_file": self.trust.gossip_key_file,
            **self._tls(agent_id, dc),
            **flags,
        }
        argv = [sys.executable, "-m", "mesh.agent.main"]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv

    def key_file(self, *keys: str) -> Path:
        """A gossip key file holding ``keys``: keys never go on a command line."""
        path = self.workdir / f"gossip-{abs(hash(keys))}.keys"
        write_secret(path, "\n".join(keys).encode())
        return path

    def key_file_key(self) -> bytes:
        """The mesh's gossip key, as the agents read it from their key file."""
        return self.trust.gossip_key_file.read_text().split()[0].encode()

    def as_agent(self, agent_id: str, dc: str = "west") -> Security:
        """The certificate of an agent ``agent_id`` of ``dc``: for calling PeerService."""
        files = self.trust.agent(agent_id, dc)
        return Security.from_files(self.trust.mesh, files.ca, files.cert, files.key)

    def cli_user(self) -> list[str]:
        """``meshctl``'s global options for the tests' user: a token, for API ports."""
        return ["--ca", str(self.trust.ca), "--token", self.security.token or ""]

    def cli_operator(self) -> list[str]:
        return cli_operator(self.trust)

    def _tls(self, agent_id: str, dc: str) -> dict[str, object]:
        files = self.trust.agent(agent_id, dc, LOCAL_HOSTS)  # HTTPS at 127.0.0.1 too
        return {"tls_ca": files.ca, "tls_cert": files.cert, "tls_key": files.key}

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
        proc = AgentProc(agent_id, dc, process, log_path, self.security)
        self.agents.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not proc.address:
            for line in proc.log().splitlines():
                if line.startswith("{") and json.loads(line).get("msg") == "agent ready":
                    ready = json.loads(line)
                    proc.address, proc.peer_address = ready["address"], ready["peer_address"]
                    proc.http_url = ready.get("http_url", "")
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


async def until_peers(agent: AgentProc, expected: list[str]) -> None:
    """Wait until ``agent`` sees exactly ``expected`` as its DC's agents."""
    async with agent.client() as client:

        async def seen() -> bool:
            return sorted(a.agent_id for a in await client.agents()) == sorted(expected)

        await eventually(seen, what=f"{agent.agent_id} to see {expected}")


def wait_log(proc: AgentProc, text: str, timeout_s: float = 20.0) -> None:
    """Wait until ``text`` appears in the agent's log (a hang guard, not a measurement)."""
    deadline = time.monotonic() + timeout_s
    while text not in proc.log():
        if proc.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{proc.agent_id} never logged {text!r}:\n{proc.log_tail()}")
        time.sleep(0.05)


def peer_channel(address: str, security: Security, dc: str = "west") -> grpc.aio.Channel:
    """A channel to an agent's mTLS port, as the agent ``security`` names."""
    return open_channel(address, security, 8 * 1024 * 1024, dc)


def cli_operator(trust: LocalTrust) -> list[str]:
    """``meshctl``'s global options for the operator's certificate (mTLS ports, etcd)."""
    pki = trust.root
    return ["--ca", str(pki / "ca.crt"), "--cert", str(pki / "operator.crt"),
            "--key", str(pki / "operator.key")]  # fmt: skip


def two_dcs(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember]
) -> tuple[dict[str, EtcdMember], Callable[[str], AgentProc]]:
    """Two DCs with an etcd each; returns the etcds and a starter for their agents."""
    etcds = {dc: more_etcd(dc) for dc in ("west", "east")}

    def start(dc: str, **flags: object) -> AgentProc:
        endpoints = json.dumps([etcds[dc].endpoint])
        return cluster.start(f"{dc}-1", dc=dc, etcd_endpoints=endpoints, **flags)

    return etcds, start


async def apply_topology(
    cluster: Cluster,
    prefix: str,
    etcds: dict[str, EtcdMember],
    seeds: dict[str, str],
    overflow: dict[str, str] | None = None,
) -> None:
    """Version 1 of a topology of ``etcds``' DCs; ``overflow``: DC to the one it spills to."""
    dcs = {
        dc: {
            "etcd": [etcds[dc].endpoint],
            "seeds": [seeds[dc]] if dc in seeds else [],
            "overflow": [{"dc": (overflow or {})[dc]}] if dc in (overflow or {}) else [],
        }
        for dc in etcds
    }
    topology = parse({"prefix": prefix, "dcs": dcs}, "test topology")
    report = await topostore.apply(topology, cluster.trust.operator())
    assert all(r.startswith("applied") for r in report.values()), report
