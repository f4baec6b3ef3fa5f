"""``python -m deploy.rehearse``: a fleet rehearsal from the files in ``deploy/`` as written.

Three network namespaces stand in for three hosts of one DC. Each runs an etcd member (the
three form one cluster, TLS and RBAC on) and an agent started the way systemd starts it
from ``mesh-agent.service``: its ``ExecStart`` (this install's ``mesh-agent`` for
``/opt/gpumesh/bin``), its ``Environment=`` and ``LoadCredential=`` (the key and the gossip
keys copied to a private credentials folder, ``%d``), ``Type=notify`` (ready when the agent
says ``READY=1``), and ``deploy/agent.yaml`` with only what differs per host changed (its id,
addresses, etcd endpoints, certificate paths, result folder, and fake GPUs: no driver here).
It then submits work, kills one host outright (its etcd member and its agent, SIGKILL),
and prints what became of every task. Exit 0 only if every task succeeded.

``--containers`` rehearses ``deploy/compose.yaml`` and ``deploy/Dockerfile`` instead, on
a container engine (``deploy.containers``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from chaos.net import Namespaces, netns_missing
from mesh.core.task import TERMINAL, state_name
from mesh.local.etcdserver import EtcdMember, find_etcd
from mesh.local.trust import LocalTrust
from mesh.sdk import AsyncClient
from mesh.store import topostore
from mesh.topology import Topology
from mesh.v1 import tasks_pb2 as pb

DEPLOY = Path(__file__).resolve().parent
HOSTS = ("h1", "h2", "h3")
DC, PREFIX, MESH = "rehearsal", "gpumesh", "gpumesh"
READY_S = 60  # the unit's TimeoutStartSec, as systemd would wait for READY=1


def unit_service(text: str) -> dict[str, list[str]]:
    """The ``[Service]`` section of a unit: each key's values in order (keys repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@dataclass
class Host:
    name: str
    ip: str
    root: Path
    etcd: EtcdMember | None = None
    agent: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None

    def kill(self) -> None:
        """The host dies: its processes go at once, without a word."""
        if self.agent is not None and self.agent.poll() is None:
            os.killpg(self.agent.pid, signal.SIGKILL)
            self.agent.wait()
        process = self.etcd.process if self.etcd is not None else None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


class Rehearsal:
    def __init__(self, workdir: Path, tasks: int) -> None:
        self.workdir = workdir
        self.tasks = tasks
        self.net = Namespaces(HOSTS)
        self.trust = LocalTrust.create(workdir / "pki", MESH)
        self.hosts = [Host(name, self.net.host(name), workdir / name) for name in HOSTS]
        self.unit = unit_service((DEPLOY / "mesh-agent.service").read_text())

    # -- the cluster ---------------------------------------------------------------------

    def start_etcd(self) -> None:
        cluster = ",".join(f"etcd-{h.name}=https://{h.ip}:2380" for h in self.hosts)
        binary = find_etcd()
        for host in self.hosts:
            name = f"etcd-{host.name}"
            host.etcd = EtcdMember(
                name,
                host.root / "etcd",
                2379,
                2380,
                host=host.ip,
                initial_cluster=cluster,
                binary=binary,
                tls=self.trust.etcd(name, [host.ip]),
                metrics_port=2381,  # health, as deploy/kubernetes probes it
                wrap=self.net.prefix(host.name),
                fast_election=False,
            )
            host.root.mkdir(parents=True, exist_ok=True)
            host.etcd.start(host.root / "etcd.log")
        for host in self.hosts:
            assert host.etcd is not None
            host.etcd.wait_healthy(30)
        endpoints = self.endpoints()
        self.trust.secure_etcd_now(endpoints, PREFIX, [DC])
        topology = Topology.model_validate(
            {
                "version": 1,
                "prefix": PREFIX,
                "dcs": {DC: {"etcd": endpoints, "seeds": [f"{h.ip}:50052" for h in self.hosts]}},
            }
        )
        asyncio.run(topostore.apply(topology, self.trust.operator()))

    def endpoints(self) -> list[str]:
        return [f"{h.ip}:2379" for h in self.hosts]

    # -- the agents, as systemd starts them --------------------------------------------------

    def config(self, host: Host) -> Path:
        """``deploy/agent.yaml`` as written, with what differs per host changed."""
        config = yaml.safe_load((DEPLOY / "agent.yaml").read_text())
        files = self.trust.agent(host.name, DC, [host.ip])
        config |= {
            "agent_id": host.name,
            "dc": DC,
            "etcd_endpoints": self.endpoints(),
            "advertise": f"{host.ip}:50051",
            "peer_advertise": f"{host.ip}:50052",
            "gossip_advertise": f"{host.ip}:7946",
            "http_advertise": f"{host.ip}:8443",
            "tls_ca": str(files.ca),
            "tls_cert": str(files.cert),
            "result_dir": str(host.root / "results"),
            "fake_gpus": "2xA100-80GB",
            "model_load_s": 0.5,
        }
        path = host.root / "etc" / "agent.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def credentials(self, host: Host) -> Path:
        """``LoadCredential=NAME:PATH``: the files copied to a folder only the service
        reads (the unit's paths under /etc/gpumesh/secrets are this host's copies)."""
        folder = host.root / "credentials"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        sources = {
            "/etc/gpumesh/secrets/agent.key": self.trust.agent(host.name, DC, [host.ip]).key,
            "/etc/gpumesh/secrets/gossip.keys": self.trust.gossip_key_file,
        }
        for item in self.unit.get("LoadCredential", []):
            name, _, source = item.partition(":")
            shutil.copy(sources[source], folder / name)
            (folder / name).chmod(0o400)
        return folder

    def start_agent(self, host: Host) -> None:
        config = self.config(host)
        credentials = self.credentials(host)
        env = {**os.environ}
        for item in self.unit.get("Environment", []):
            key, _, value = item.partition("=")
            env[key] = value.replace("%d", str(credentials))
        assert self.unit["Type"] == ["notify"], "the rehearsal waits for READY=1 as systemd does"
        host.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = host.root / "notify.sock"
        host.notify.bind(str(notify_path))
        env["NOTIFY_SOCKET"] = str(notify_path)
        (exec_start,) = self.unit["ExecStart"]
        argv = exec_start.split()
        argv[0] = shutil.which("mesh-agent") or sys.exit("mesh-agent is not installed")
        argv[argv.index("/etc/gpumesh/agent.yaml")] = str(config)
        with (host.root / "agent.log").open("ab") as log:
            host.agent = subprocess.Popen(
                [*self.net.prefix(host.name), *argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, host: Host) -> None:
        assert host.notify is not None
        host.notify.settimeout(READY_S)
        try:
            while True:
                message = host.notify.recv(4096).decode()
                if "READY=1" in message.splitlines():
                    return
        except TimeoutError:
            why = f"{host.name} never said READY=1; see {host.root}/agent.log"
            raise RuntimeError(why) from None

    # -- the work ------------------------------------------------------------------------

    async def run_work(self) -> dict[str, pb.TaskStatus]:
        user = self.trust.user("rehearsal")
        addresses = [f"{h.ip}:50051" for h in self.hosts]
        async with AsyncClient(addresses, user) as client:
            ids = [f"r-{i:03d}" for i in range(self.tasks)]
            for task_id in ids:
                params = {"seconds": "2", "steps": "4"}
                await client.submit("sleep", "sdxl-1.0", params=params, task_id=task_id)
            print(f"submitted {len(ids)} tasks over {len(self.hosts)} hosts")
            running = await until(client, ids, lambda s: s.state == pb.TASK_STATE_RUNNING, any)
            victim = next(h for h in self.hosts if any(
                s.agent == h.name and s.state == pb.TASK_STATE_RUNNING for s in running.values()
            ))  # fmt: skip
            print(f"killing host {victim.name} (etcd member and agent, SIGKILL) mid-task")
            victim.kill()
            killed_at = time.monotonic()
            statuses = await until(client, ids, lambda s: s.state in TERMINAL, all)
            print(f"every task ended {time.monotonic() - killed_at:.1f} s after the kill")
            return statuses

    # -- all of it -----------------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        self.net.open()
        try:
            self.start_etcd()
            for host in self.hosts:
                self.start_agent(host)
            for host in self.hosts:
                self.wait_ready(host)
            took = time.monotonic() - started
            print(f"3 hosts up from deploy/ in {took:.1f} s: {self.unit['ExecStart'][0]}")
            statuses = asyncio.run(self.run_work())
        finally:
            self.close()
        return self.report(statuses, started)

    def report(self, statuses: dict[str, pb.TaskStatus], started: float) -> int:
        by_state: dict[str, int] = {}
        reruns = 0
        for status in statuses.values():
            by_state[state_name(status.state)] = by_state.get(state_name(status.state), 0) + 1
            reruns += status.attempt > 1
        where: dict[str, int] = {}
        for status in statuses.values():
            where[status.agent] = where.get(status.agent, 0) + 1
        print(json.dumps({"states": by_state, "reran_after_the_kill": reruns, "ran_on": where}))
        print(f"rehearsal took {time.monotonic() - started:.1f} s")
        ok = by_state == {"SUCCEEDED": len(statuses)}
        print("every task succeeded" if ok else "NOT every task succeeded")
        return 0 if ok else 1

    def close(self) -> None:
        for host in self.hosts:
            host.kill()
            if host.notify is not None:
                host.notify.close()
        self.net.close()


async def until(
    client: AsyncClient,
    ids: list[str],
    done: Callable[[pb.TaskStatus], bool],
    quantifier: Callable[[Iterable[bool]], bool],
    bound_s: float = 90,  # a bound, not a measurement
) -> dict[str, pb.TaskStatus]:
    """The tasks' statuses once ``quantifier`` of ``done`` holds over them."""
    deadline = time.monotonic() + bound_s
    while True:
        statuses = {t: await client.task(t).status() for t in ids}
        if quantifier(done(s) for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            raise RuntimeError("the rehearsal ran past its bound")
        await asyncio.sleep(0.25)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.rehearse", description=__doc__)
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--containers", action="store_true", help="the compose fleet instead (deploy.containers)"
    )
    parser.add_argument("--base", help="with --containers: the agent image's base")
    parser.add_argument("--json", action="store_true", help="with --containers: figures only")
    args = parser.parse_args(argv)
    if args.containers:
        return containers(args.tasks, args.base, args.json)
    if (missing := netns_missing()) is not None:
        print(f"cannot rehearse: {missing}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gpumesh-rehearsal-"))
    try:
        return Rehearsal(workdir, args.tasks).run()
    finally:
        if args.keep:
            print(f"work folder: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def containers(tasks: int, base: str | None, as_json: bool) -> int:
    """The compose fleet rehearsal; exit 0 only if every task succeeded and nothing of the
    fleet is left."""
    from deploy.containers import rehearse  # the docker SDK: only for this one
    from deploy.engine import require, serving

    with serving() as engine:
        figures = rehearse(require(engine, "the container rehearsal"), tasks, base)
    if as_json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:>14}: {value}")
    ok = figures["succeeded"] == tasks and not figures["left_behind"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
