"""The mesh under test: two DCs of real processes, and the levers the faults pull.

``west`` has a 3-member etcd cluster, ``east`` a single member; each DC has
``agents_per_dc`` agents with two fake GPUs. It runs as secure as a fleet: etcd with TLS,
client certificates and RBAC, agents with their own certificates and the gossip key,
clients with tokens (``mesh.local.trust``). Every agent writes its history (``mesh
.history``) under ``workdir/history``, where the load generator and the fault schedule
write theirs, so the checker reads one timeline. Everything started is stopped by
``close()``, which the runner calls whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aetcd
import aetcd.rpc
import grpc
import yaml

from chaos.load import GROUP, USER
from chaos.net import Loopback, Namespaces, Network
from mesh.channels import Security, agent_healthy
from mesh.core import backlog
from mesh.core.tenants import Tenants
from mesh.local.etcdserver import EtcdMember, find_etcd
from mesh.local.localmesh import MESH, free_port
from mesh.local.trust import LocalTrust
from mesh.store import topostore
from mesh.store.etcd import client_for, stub_options
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.quota import apply_policy
from mesh.topology import Topology

PREFIX = "chaos"
# The load's tenant is capped a little below the DC's 6 GPUs, so quota is in play in every
# scenario and the checker proves no cap is ever exceeded (``checker.check_caps``).
TENANTS = Tenants.model_validate(
    {"groups": {GROUP: {"max_gpus": 5, "users": {USER: {"max_gpus": 5}}}}}
)
DCS = {"west": 3, "east": 1}  # etcd members per DC
MODEL = "sdxl-1.0"
AGENT_FLAGS = {
    "fake_gpus": "2xA100-80GB",
    "preloaded_models": json.dumps([MODEL]),
    "model_load_s": "0.2",
    "max_queue_length": "4",
    "drain_grace_s": "2",
    "drain_notice_s": "1",
    "gossip_interval_s": "0.2",
    "progress_interval_s": "0.5",
}


def etcd_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    found = re.search(r"etcd Version: (\S+)", done.stdout)
    return found.group(1) if found else "unknown"


@dataclass
class Agent:
    name: str
    dc: str
    address: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, sig)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.pid, signal.SIGCONT)  # a stopped agent cannot drain
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class ChaosMesh:
    workdir: Path
    net: Network = field(default_factory=Loopback)
    ttl_s: int = 3
    agents_per_dc: int = 3
    etcd: dict[str, list[EtcdMember]] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)
    trust: LocalTrust | None = None

    @property
    def operator(self) -> Security:
        assert self.trust is not None
        return self.trust.operator()

    @property
    def history_dir(self) -> Path:
        return self.workdir / "history"

    def endpoints(self, dc: str) -> list[str]:
        return [m.endpoint for m in self.etcd[dc]]

    def in_dc(self, dc: str) -> list[Agent]:
        return [a for a in self.agents.values() if a.dc == dc]

    # -- bringing it up -------------------------------------------------------------------

    def _port(self, fixed: int) -> int:
        """Inside its own namespace each DC has every port; on loopback they are shared."""
        return fixed if isinstance(self.net, Namespaces) else free_port()

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.history_dir.mkdir(parents=True, exist_ok=True)
        self.trust = LocalTrust.create(self.workdir / "pki", MESH)
        binary = find_etcd()
        for dc, members in DCS.items():
            host = self.net.host(dc)
            ports = [(self._port(23790 + i), self._port(23800 + i)) for i in range(members)]
            names = [f"etcd-{dc}-{i}" for i in range(members)]
            cluster = ",".join(
                f"{n}=https://{host}:{peer}" for n, (_, peer) in zip(names, ports, strict=True)
            )
            self.etcd[dc] = [
                EtcdMember(
                    name,
                    self.workdir / "etcd" / name,
                    client,
                    peer,
                    host=host,
                    initial_cluster=cluster,
                    binary=binary,
                    tls=self.trust.etcd(name, [host]),
                    metrics_port=self._port(23810 + i),
                    wrap=self.net.prefix(dc),
                )
                for i, (name, (client, peer)) in enumerate(zip(names, ports, strict=True))
            ]
        for dc in DCS:
            for member in self.etcd[dc]:
                member.start(self.workdir / "logs" / f"{member.name}.log")
        for dc in DCS:
            for member in self.etcd[dc]:
                member.wait_healthy(20)
        for dc in DCS:
            self.trust.secure_etcd_now(self.endpoints(dc), PREFIX, [dc])
        addresses = {dc: [self._addresses(dc, i) for i in range(self.agents_per_dc)] for dc in DCS}
        self._apply_topology({dc: [peer for _, peer in pairs] for dc, pairs in addresses.items()})
        asyncio.run(self._apply_tenants())
        for dc in DCS:
            for i, (address, peer) in enumerate(addresses[dc], start=1):
                agent = self._agent(f"{dc}-{i}", dc, address, peer)
                self.agents[agent.name] = agent
                agent.start()
        self.wait_serving(60)

    def _addresses(self, dc: str, i: int) -> tuple[str, str]:
        """Agent ``i`` of ``dc``: its API port and its mTLS port."""
        host = self.net.host(dc)
        return f"{host}:{self._port(50100 + i)}", f"{host}:{self._port(50200 + i)}"

    def _apply_topology(self, addresses: dict[str, list[str]]) -> None:
        topology = Topology.model_validate(
            {
                "version": 1,
                "prefix": PREFIX,
                "dcs": {
                    dc: {
                        "etcd": self.endpoints(dc),
                        "seeds": addresses[dc],
                        "overflow": [{"dc": other, "weight": 1} for other in DCS if other != dc],
                        "max_spill_share": 0.5,
                    }
                    for dc in DCS
                },
                "queues": {"vip": 8, "normal": 2},
            }
        )
        report = asyncio.run(topostore.apply(topology, self.operator))
        failed = {dc: what for dc, what in report.items() if not what.startswith("applied")}
        if failed:
            raise RuntimeError(f"could not apply the topology: {failed}")

    async def _apply_tenants(self) -> None:
        text = yaml.safe_dump(TENANTS.model_dump(mode="json", exclude_none=True))
        for dc in DCS:
            async with self.client(dc) as client:
                await apply_policy(EtcdKv(client), KeySpace(PREFIX, dc), text)

    def _agent(self, name: str, dc: str, address: str, peer: str) -> Agent:
        assert self.trust is not None
        files = self.trust.agent(name, dc)
        flags = {
            "agent_id": name,
            "dc": dc,
            "prefix": PREFIX,
            "etcd_endpoints": json.dumps(self.endpoints(dc)),
            "listen": address,
            "peer_listen": peer,
            "mesh_name": MESH,
            "tls_ca": str(files.ca),
            "tls_cert": str(files.cert),
            "tls_key": str(files.key),
            "gossip_key_file": str(self.trust.gossip_key_file),
            "lease_ttl_s": str(self.ttl_s),
            "result_dir": str(self.workdir / "results"),
            "history": str(self.history_dir / f"{name}.jsonl"),
            "span_dir": str(self.workdir / "spans"),  # to read a hop that misbehaved
            **AGENT_FLAGS,
        }
        argv = [*self.net.prefix(dc), sys.executable, "-m", "mesh.agent.main"]
        for key, value in flags.items():
            argv += [f"--{key.replace('_', '-')}", value]
        return Agent(name, dc, address, argv, self.workdir / "logs" / f"{name}.log")

    def wait_serving(self, timeout_s: float) -> float:
        """Block until every agent answers its health check; the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        waiting = list(self.agents.values())
        while waiting:
            for agent in waiting:
                if not agent.alive():
                    raise RuntimeError(f"agent {agent.name} exited; see {agent.log_path}")
            waiting = [a for a in waiting if not agent_healthy(a.address, self.operator)]
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"agents not serving: {[a.name for a in waiting]}")
            time.sleep(0.1)
        return time.monotonic() - started

    # -- what the checker and the scenarios read --------------------------------------------

    def client(self, dc: str) -> aetcd.Client:
        """etcd of ``dc``, as the operator (it reads everything the checker needs)."""
        return client_for(self.endpoints(dc), security=self.operator)

    async def members(self, dc: str) -> set[str]:
        keys = KeySpace(PREFIX, dc)
        async with self.client(dc) as client:
            listing = await client.get_prefix(keys.agents)
            return {kv.key[len(keys.agents) :].decode() for kv in listing}

    async def backlog(self, dc: str) -> tuple[int, float]:
        """How many tasks wait in ``dc``'s backlog now, and how long the oldest has."""
        keys = KeySpace(PREFIX, dc)
        async with self.client(dc) as client:
            listing = await client.get_prefix(keys.backlog, keys_only=True)
        waiting = backlog.by_class({kv.key[len(keys.backlog) :].decode(): b"" for kv in listing})
        oldest = min((w[0].enqueued_ms for w in waiting.values() if w), default=None)
        return sum(map(len, waiting.values())), (
            0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
        )

    async def owner(self, dc: str) -> str | None:
        """The agent that leads ``dc``'s queue now (etcd's election recipe)."""
        keys = KeySpace(PREFIX, dc)
        async with self.client(dc) as client:
            candidates = list(await client.get_prefix(keys.election + b"/"))
        if not candidates:
            return None
        first = min(candidates, key=lambda kv: kv.create_revision)
        return first.value.decode().split()[0]

    async def etcd_leader(self, dc: str) -> EtcdMember | None:
        """The member of ``dc``'s cluster that leads now, by its own status (over gRPC:
        etcd's HTTP gateway refuses client certificates that name a user)."""
        for member in self.etcd[dc]:
            if member.process is None or member.process.poll() is not None:
                continue
            try:
                async with client_for([member.endpoint], 1, self.operator) as client:
                    status = await client.maintenancestub.Status(
                        aetcd.rpc.StatusRequest(), **stub_options(client)
                    )
            except (aetcd.ClientError, grpc.aio.AioRpcError):
                continue
            if status.leader == status.header.member_id:
                return member
        return None

    async def etcd_write_error(self, dc: str) -> str | None:
        """Why a write to ``dc``'s etcd fails now, as the agents' client reports it; None
        if it succeeds."""
        try:
            async with client_for(self.endpoints(dc), 1, self.operator) as client:
                await client.put(f"/{PREFIX}/{dc}/probe".encode(), b"1")
        except aetcd.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def etcd_writable(self, dc: str) -> bool:
        return await self.etcd_write_error(dc) is None

    # -- tearing down ---------------------------------------------------------------------

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for members in self.etcd.values():
            for member in members:
                if member.process is not None and member.process.poll() is None:
                    member.process.kill()
                    member.process.wait()
