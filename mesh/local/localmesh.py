"""A whole mesh on one machine: one etcd per DC and agents with fake GPUs, as processes.

``meshctl up`` and ``meshctl demo`` use it. It is secure with no extra step: it makes the
mesh's CA and every certificate under the state folder (``mesh.local.trust``), runs each
etcd with TLS, client certificates and RBAC, and each agent with its own certificate
and the mesh's gossip key. What it started is written to a state file, so ``meshctl
down`` (another process, later) stops exactly that and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mesh.channels import Security, agent_healthy
from mesh.core.access import OPERATOR
from mesh.errors import ConfigError, Unavailable
from mesh.local.etcdserver import EtcdMember
from mesh.local.trust import LocalTrust
from mesh.store import topostore
from mesh.store.etcd import client_for
from mesh.store.keys import KeySpace
from mesh.store.registry import AgentRecord
from mesh.topology import LocalAgent, Topology
from mesh.trust.pki import private_dir, write_secret

STATE_FILE = "state.json"
MESH = "gpumesh"  # the local mesh's trust domain


DEFAULT_HOME = Path.home() / ".gpumesh" / "local"  # meshctl's --home; MESH_HOME overrides


LOWEST_PORT = 10_000  # free_port draws from here up to the kernel's ephemeral range
_handed_out: set[int] = set()


def free_port() -> int:
    """A free port for a server that will start a moment later, drawn from below the
    kernel's ephemeral range. A port the kernel picks (bind to 0) is free now, but it is
    of the kind the kernel gives the next outbound connection: the mesh's own gRPC and
    etcd connections took such a port before the agent meant to listen on it did
    ("address already in use"). Ports this process handed out are not handed out again."""
    below = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(LOWEST_PORT, below)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise Unavailable(f"no free port between {LOWEST_PORT} and {below}")


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outbound connections (Linux's default 32768)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    return max(low, LOWEST_PORT + 1000)


@dataclass
class Started:
    """One process this launcher started."""

    kind: str  # "etcd" or "agent"
    name: str
    dc: str
    pid: int
    address: str  # an agent's API port (tokens); an etcd member's client endpoint
    peer_address: str = ""  # an agent's mTLS port
    since: float = 0.0  # when the process started, by the kernel's clock (proc_started)
    http_url: str = ""  # an agent's HTTP API and console
    metrics: str = ""  # an etcd member's plain-HTTP metrics endpoint (host:port)


def proc_started(pid: int) -> float:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``); 0.0
    if there is no such process. With the PID, it names one process for good: a PID the
    kernel gave to another process since has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    return float(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after "(comm)"


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


# The local agents' certificates also name this machine, so a browser or curl reaches
# their HTTP ports at https://127.0.0.1:PORT with the mesh's CA.
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def spans_of(home: Path) -> Path:
    return home / "spans"


class LocalMesh:
    def __init__(self, topology: Topology, home: Path, mesh: str = MESH) -> None:
        if topology.local is None:
            raise ConfigError("the topology has no 'local' section: nothing to start")
        self.topology = topology
        self.local = topology.local
        self.home = home
        self.mesh = mesh
        self.started: list[Started] = []
        self.trust: LocalTrust | None = None

    @property
    def operator(self) -> Security:
        assert self.trust is not None, "up() makes the trust material"
        return self.trust.operator()

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    @property
    def spans(self) -> Path:
        """Where the agents write their trace spans (``meshctl trace`` reads them)."""
        return spans_of(self.home)

    def _save(self) -> None:
        write_secret(
            self.state_path,
            json.dumps(
                {"prefix": self.topology.prefix, "started": [asdict(s) for s in self.started]},
                indent=2,
            ).encode(),
        )

    def up(self, timeout_s: float = 30.0) -> list[Started]:
        if self.state_path.exists() and any(_alive(s.pid) for s in read_state(self.home)):
            raise ConfigError(
                f"a local mesh is already running from {self.home}; run 'meshctl down' first"
            )
        shutil.rmtree(self.home, ignore_errors=True)
        private_dir(self.home)
        private_dir(self.home / "logs")
        self.trust = LocalTrust.create(self.home / "pki", self.mesh)
        try:
            self._start_etcds()
            ids = [spec.id for agents in self.local.agents.values() for spec in agents]
            addresses = {i: (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}") for i in ids}
            self._apply_topology({i: peer for i, (_, peer) in addresses.items()})
            self._start_agents(addresses)
            self._wait_agents(timeout_s)
        except BaseException:
            self.down()
            raise
        return self.started

    def _start_etcds(self) -> None:
        assert self.trust is not None
        members = []
        for name, dc in self.topology.dcs.items():
            host, _, port = dc.etcd[0].rpartition(":")
            member = EtcdMember(
                f"etcd-{name}",
                self.home / "etcd" / name,
                int(port),
                free_port(),
                host=host,
                tls=self.trust.etcd(f"etcd-{name}", [host]),
                metrics_port=free_port(),
                compaction=self.local.etcd_compaction,
            )
            member.start(self.home / "logs" / f"etcd-{name}.log")
            assert member.process is not None
            pid = member.process.pid
            self.started.append(
                Started(
                    "etcd",
                    member.name,
                    name,
                    pid,
                    member.endpoint,
                    since=proc_started(pid),
                    metrics=f"{host}:{member.metrics_port}",
                )
            )
            self._save()
            members.append(member)
        for member in members:
            member.wait_healthy()
        for name, dc in self.topology.dcs.items():
            self.trust.secure_etcd_now(dc.etcd, self.topology.prefix, [name])

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
        report = asyncio.run(
            topostore.apply(self.topology.model_copy(update={"dcs": dcs}), self.operator)
        )
        failed = {dc: what for dc, what in report.items() if not what.startswith("applied")}
        if failed:
            raise Unavailable(f"could not apply the topology: {failed}")

    def _start_agents(self, addresses: dict[str, tuple[str, str]]) -> None:
        for dc, agents in self.local.agents.items():
            for spec in agents:
                address, peer = addresses[spec.id]
                http = f"127.0.0.1:{free_port()}"
                argv = self._agent_argv(spec, dc, address, peer, http)
                with (self.home / "logs" / f"{spec.id}.log").open("ab") as log:
                    proc = subprocess.Popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                self.started.append(
                    Started(
                        "agent",
                        spec.id,
                        dc,
                        proc.pid,
                        address,
                        peer,
                        proc_started(proc.pid),
                        f"https://{http}",
                    )
                )
                self._save()

    def _agent_argv(
        self, spec: LocalAgent, dc: str, address: str, peer: str, http: str
    ) -> list[str]:
        """The command line of one local agent."""
        assert self.trust is not None
        files = self.trust.agent(spec.id, dc, LOCAL_HOSTS)
        argv = [
            sys.executable, "-m", "mesh.agent.main",
            "--agent-id", spec.id,
            "--dc", dc,
            "--prefix", self.topology.prefix,
            "--etcd-endpoints", json.dumps(self.topology.dcs[dc].etcd),
            "--listen", address,
            "--peer-listen", peer,
            "--mesh-name", self.mesh,
            "--tls-ca", str(files.ca),
            "--tls-cert", str(files.cert),
            "--tls-key", str(files.key),
            "--gossip-key-file", str(self.trust.gossip_key_file),
            "--fake-gpus", spec.fake_gpus,
            "--queues", json.dumps(self.topology.queues),
            "--commands", json.dumps(self.local.commands),
            "--model-load-s", str(self.local.model_load_s),
            "--result-dir", str(self.home / "results"),
            "--drain-grace-s", "3",
            "--max-queue-length", str(self.local.max_queue_length),
            "--default-model-memory-mb", str(self.local.model_memory_mb),
            "--model-memory-mb", json.dumps(self.local.model_sizes_mb),
            "--placement-plan", str(self.local.placement_plan).lower(),
            "--work-conserving", str(self.local.work_conserving).lower(),
            "--plan-interval-s", str(self.local.plan_interval_s),
            "--task-retention-s", str(self.local.task_retention_s),
            "--span-dir", str(self.spans),
            "--http-listen", http,
            "--metrics-listen", "127.0.0.1:0",
        ]  # fmt: skip
        if self.local.decision_log:
            argv += ["--decision-log", str(self.home / "logs" / f"decisions-{spec.id}.jsonl")]
        # Only non-empty lists: the CLI parser reads '[]' as [''].
        lists = (("--models", spec.models), ("--preloaded-models", spec.preloaded_models))
        for flag, names in lists:
            if names:
                argv += [flag, json.dumps(names)]
        return argv

    def console_url(self) -> str:
        """The web console of the first agent, with an operator's token for a day in the
        URL's fragment (a browser never sends a fragment to a server)."""
        assert self.trust is not None, "up() makes the trust material"
        first = next(s for s in self.started if s.kind == "agent")
        token = self.trust.token("console", roles=[OPERATOR], ttl=datetime.timedelta(days=1))
        return f"{first.http_url}/ui/#token={token}"

    def _wait_agents(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = [s for s in self.started if s.kind == "agent"]
        while waiting:
            for s in waiting:
                if not _alive(s.pid) or _reaped(s.pid):
                    raise Unavailable(f"agent {s.name} exited; see {self.home}/logs/{s.name}.log")
            waiting = [s for s in waiting if not agent_healthy(s.address, self.operator)]
            if waiting and time.monotonic() > deadline:
                raise Unavailable(
                    f"agents not serving after {timeout_s:.0f}s: {[s.name for s in waiting]}"
                )
            time.sleep(0.1)

    def gossip_address(self, agent_id: str) -> str:
        """Where agent ``agent_id`` listens for gossip, as it registered."""
        dc = next(s.dc for s in self.started if s.kind == "agent" and s.name == agent_id)

        async def read() -> str:
            async with client_for(self.topology.dcs[dc].etcd, security=self.operator) as etcd:
                got = await etcd.get(KeySpace(self.topology.prefix, dc).agent(agent_id))
            assert got is not None, f"{agent_id} is not registered"
            return AgentRecord.from_json(got.value).gossip_address

        return asyncio.run(read())

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
    """Stop what the state file lists, agents first (they drain), then etcd: only the
    processes that are provably the ones started (same PID, same start time), never a
    process that happens to hold a recorded PID now."""
    ours = [s for s in read_state(home) if s.since and proc_started(s.pid) == s.since]
    _stop_pids([s.pid for s in ours if s.kind == "agent"], timeout_s)
    _stop_pids([s.pid for s in ours if s.kind == "etcd"], timeout_s)
    (home / STATE_FILE).unlink(missing_ok=True)
    return ours
