"""A whole mesh on one machine: one etcd per DC and agents with fake GPUs, as processes.

``meshctl up`` and ``meshctl demo`` use it. What it started is written to a state file,
so ``meshctl down`` (another process, later) stops exactly that and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.errors import ConfigError, Unavailable
from mesh.local.etcdserver import EtcdMember
from mesh.store import topostore
from mesh.topology import Topology

STATE_FILE = "state.json"


DEFAULT_HOME = Path.home() / ".gpumesh" / "local"  # meshctl's --home; MESH_HOME overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Started:
    """One process this launcher started."""

    kind: str  # "etcd" or "agent"
    name: str
    dc: str
    pid: int
    address: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_pids(pids: list[int], timeout_s: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
        for pid in pids:  # reap our own children so they do not linger as zombies
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def agent_healthy(address: str, timeout_s: float = 0.5) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class LocalMesh:
    def __init__(self, topology: Topology, home: Path) -> None:
        if topology.local is None:
            raise ConfigError("the topology has no 'local' section: nothing to start")
        self.topology = topology
        self.local = topology.local
        self.home = home
        self.started: list[Started] = []

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    def _save(self) -> None:
        self.state_path.write_text(
            json.dumps(
                {"prefix": self.topology.prefix, "started": [asdict(s) for s in self.started]},
                indent=2,
            )
        )

    def up(self, timeout_s: float = 30.0) -> list[Started]:
        if self.state_path.exists() and any(_alive(s.pid) for s in read_state(self.home)):
            raise ConfigError(
                f"a local mesh is already running from {self.home}; run 'meshctl down' first"
            )
        shutil.rmtree(self.home, ignore_errors=True)
        (self.home / "logs").mkdir(parents=True)
        try:
            self._start_etcds()
            addresses = {
                spec.id: f"127.0.0.1:{free_port()}"
                for agents in self.local.agents.values()
                for spec in agents
            }
            self._apply_topology(addresses)
            self._start_agents(addresses)
            self._wait_agents(timeout_s)
        except BaseException:
            self.down()
            raise
        return self.started

    def _start_etcds(self) -> None:
        members = []
        for name, dc in self.topology.dcs.items():
            host, _, port = dc.etcd[0].rpartition(":")
            member = EtcdMember(
                f"etcd-{name}", self.home / "etcd" / name, int(port), free_port(), host=host
            )
            member.start(self.home / "logs" / f"etcd-{name}.log")
            assert member.process is not None
            self.started.append(
                Started("etcd", member.name, name, member.process.pid, member.endpoint)
            )
            self._save()
            members.append(member)
        for member in members:
            member.wait_healthy()

    def _apply_topology(self, addresses: dict[str, str]) -> None:
        """Apply the topology to every DC's etcd, seeds filled in with our agents."""
        dcs = {
            name: dc.model_copy(
                update={
                    "seeds": dc.seeds or [addresses[a.id] for a in self.local.agents.get(name, [])]
                }
            )
            for name, dc in self.topology.dcs.items()
        }
        report = asyncio.run(topostore.apply(self.topology.model_copy(update={"dcs": dcs})))
        failed = {dc: what for dc, what in report.items() if not what.startswith("applied")}
        if failed:
            raise Unavailable(f"could not apply the topology: {failed}")

    def _start_agents(self, addresses: dict[str, str]) -> None:
        gossip_key = secrets.token_hex(16)  # this mesh's own: its gossip is authenticated
        for dc, agents in self.local.agents.items():
            for spec in agents:
                address = addresses[spec.id]
                argv = [
                    sys.executable, "-m", "mesh.agent.main",
                    "--agent-id", spec.id,
                    "--dc", dc,
                    "--prefix", self.topology.prefix,
                    "--etcd-endpoints", json.dumps(self.topology.dcs[dc].etcd),
                    "--listen", address,
                    "--fake-gpus", spec.fake_gpus,
                    "--queues", json.dumps(self.topology.queues),
                    "--commands", json.dumps(self.local.commands),
                    "--model-load-s", str(self.local.model_load_s),
                    "--result-dir", str(self.home / "results"),
                    "--drain-grace-s", "3",
                    "--max-queue-length", str(self.local.max_queue_length),
                    "--gossip-keys", json.dumps([gossip_key]),
                    "--decision-log", str(self.home / "logs" / f"decisions-{spec.id}.jsonl"),
                ]  # fmt: skip
                # Only non-empty lists: the CLI parser reads '[]' as [''].
                for flag, names in (
                    ("--models", spec.models),
                    ("--preloaded-models", spec.preloaded_models),
                ):
                    if names:
                        argv += [flag, json.dumps(names)]
                with (self.home / "logs" / f"{spec.id}.log").open("ab") as log:
                    proc = subprocess.Popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                self.started.append(Started("agent", spec.id, dc, proc.pid, address))
                self._save()

    def _wait_agents(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = [s for s in self.started if s.kind == "agent"]
        while waiting:
            for s in waiting:
                if not _alive(s.pid) or _reaped(s.pid):
                    raise Unavailable(f"agent {s.name} exited; see {self.home}/logs/{s.name}.log")
            waiting = [s for s in waiting if not agent_healthy(s.address)]
            if waiting and time.monotonic() > deadline:
                raise Unavailable(
                    f"agents not serving after {timeout_s:.0f}s: {[s.name for s in waiting]}"
                )
            time.sleep(0.1)

    def down(self) -> None:
        stop(self.home)


def _reaped(pid: int) -> bool:
    """True if ``pid`` is our child and has exited (reaping it)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def read_state(home: Path) -> list[Started]:
    path = home / STATE_FILE
    if not path.exists():
        return []
    return [Started(**s) for s in json.loads(path.read_text())["started"]]


def stop(home: Path, timeout_s: float = 10.0) -> list[Started]:
    """Stop what the state file lists: agents first (they drain), then etcd."""
    started = read_state(home)
    _stop_pids([s.pid for s in started if s.kind == "agent"], timeout_s)
    _stop_pids([s.pid for s in started if s.kind == "etcd"], timeout_s)
    (home / STATE_FILE).unlink(missing_ok=True)
    return started
