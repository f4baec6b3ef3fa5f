"""Where the chaos mesh's DCs live: network namespaces joined by a WAN router, or loopback.

With namespaces (root, ``ip``, ``iptables``), each DC is a namespace of its own, and a
third one, the WAN, routes between them and to the harness in the root namespace::

    root 10.77.0.1 --- 10.77.0.2 [wan] 10.77.1.1 --- 10.77.1.2 [west]
                                       10.77.2.1 --- 10.77.2.2 [east]

Faults are rules in the WAN namespace only, so they never touch the host's own tables:
a partition drops what is forwarded between the DC subnets; latency redirects their TCP
to the delay proxy (``chaos.proxy``) running in the WAN; loss drops a share of what
enters that proxy. Forwarding is switched on in the WAN namespace, not the host.

Without them, every process runs on 127.0.0.1, and the scenarios that need the network
report that they were not run, and why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

PROXY_PORT = 7070  # the delay proxy's port in the WAN namespace
EPHEMERAL = "50300 60999"  # outgoing ports inside a DC: above every port the mesh listens on


class NetError(RuntimeError):
    pass


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


class Network(Protocol):
    """Hosts for each DC, a command prefix to start a process in one, and the faults."""

    kind: str

    def host(self, dc: str) -> str: ...

    def prefix(self, dc: str) -> list[str]: ...

    def close(self) -> None: ...


@dataclass
class Loopback:
    kind: str = "loopback"

    def host(self, dc: str) -> str:
        return "127.0.0.1"

    def prefix(self, dc: str) -> list[str]:
        return []

    def close(self) -> None:
        pass


def netns_missing() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    return None


@dataclass
class Namespaces:
    dcs: tuple[str, ...]
    tag: str = field(default_factory=lambda: f"gm{os.getpid() % 100000}")
    kind: str = "netns"
    _created: list[str] = field(default_factory=list)
    _proxy: subprocess.Popen[bytes] | None = None

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def subnet(self, dc: str) -> str:
        return f"10.77.{self.dcs.index(dc) + 1}"

    def host(self, dc: str) -> str:
        return f"{self.subnet(dc)}.2"

    def prefix(self, dc: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(dc)]

    def _in(self, name: str, *argv: str) -> None:
        _run("ip", "netns", "exec", self.ns(name), *argv)

    def open(self) -> None:
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        wan = self.ns("wan")
        for name in ("wan", *self.dcs):
            _run("ip", "netns", "add", self.ns(name))
            self._created.append(self.ns(name))
            self._in(name, "ip", "link", "set", "lo", "up")
        self._in("wan", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        root_if = f"{self.tag}r"
        _run("ip", "link", "add", root_if, "type", "veth", "peer", "name", "r", "netns", wan)
        _run("ip", "addr", "add", "10.77.0.1/30", "dev", root_if)
        _run("ip", "link", "set", root_if, "up")
        self._in("wan", "ip", "addr", "add", "10.77.0.2/30", "dev", "r")
        self._in("wan", "ip", "link", "set", "r", "up")
        for index, dc in enumerate(self.dcs, start=1):
            net = self.subnet(dc)
            self._in(
                "wan", "ip", "link", "add", f"d{index}", "type", "veth",
                "peer", "name", "eth0", "netns", self.ns(dc),
            )  # fmt: skip
            self._in("wan", "ip", "addr", "add", f"{net}.1/24", "dev", f"d{index}")
            self._in("wan", "ip", "link", "set", f"d{index}", "up")
            self._in(dc, "ip", "addr", "add", f"{net}.2/24", "dev", "eth0")
            self._in(dc, "ip", "link", "set", "eth0", "up")
            # The mesh listens on fixed ports inside a DC's namespace (etcd 2379x/2380x/
            # 2381x, agents 501xx/502xx); keep outgoing connections' ephemeral ports above
            # them, or one may take a port an agent is about to bind.
            self._in(dc, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={EPHEMERAL}")
            self._in(dc, "ip", "route", "add", "default", "via", f"{net}.1")
            _run("ip", "route", "add", f"{net}.0/24", "via", "10.77.0.2", "dev", root_if)

    # -- faults: rules in the WAN namespace only --------------------------------------------

    def _between(self) -> list[tuple[str, str]]:
        nets = [f"{self.subnet(dc)}.0/24" for dc in self.dcs]
        return [(a, b) for a in nets for b in nets if a != b]

    def partition(self, on: bool) -> None:
        for src, dst in self._between():
            self._in(
                "wan", "iptables", "-A" if on else "-D", "FORWARD",
                "-s", src, "-d", dst, "-j", "DROP",
            )  # fmt: skip

    def latency(self, delay_ms: float, jitter_ms: float, log: Path) -> None:
        """Route TCP between the DCs through the delay proxy (both directions); it logs
        each connection it relays to ``log``."""
        self._proxy = subprocess.Popen(
            [
                *self.prefix("wan"), sys.executable, "-m", "chaos.proxy",
                "--port", str(PROXY_PORT), "--log", str(log),
                "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        for src, dst in self._between():
            self._in(
                "wan", "iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
                "-s", src, "-d", dst, "-j", "REDIRECT", "--to-ports", str(PROXY_PORT),
            )  # fmt: skip
            # NAT binds when a connection opens: connections that predate the proxy are
            # still forwarded as before. Reset them, so that they reconnect through it.
            self._in(
                "wan", "iptables", "-A", "FORWARD", "-p", "tcp", "-s", src, "-d", dst,
                "-j", "REJECT", "--reject-with", "tcp-reset",
            )  # fmt: skip

    def loss(self, probability: float) -> None:
        """Drop a share of the packets that reach the proxy from either DC."""
        for index in range(1, len(self.dcs) + 1):
            self._in(
                "wan", "iptables", "-A", "INPUT", "-i", f"d{index}", "-m", "statistic",
                "--mode", "random", "--probability", f"{probability:.3f}", "-j", "DROP",
            )  # fmt: skip

    def dropped(self) -> int:
        """Packets the WAN's DROP rules have dropped so far: proof a fault was exercised."""
        done = subprocess.run(
            [*self.prefix("wan"), "iptables", "-L", "-v", "-x", "-n"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return sum(
            int(fields[0])
            for line in done.stdout.splitlines()
            if len(fields := line.split()) > 2 and fields[2] == "DROP" and fields[0].isdigit()
        )

    def clear(self) -> None:
        """Back to a clean WAN: no rules, no proxy."""
        for table in ("filter", "nat"):
            self._in("wan", "iptables", "-t", table, "-F")
        if self._proxy is not None:
            self._proxy.kill()
            self._proxy.wait()
            self._proxy = None

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.kill()
            self._proxy.wait()
            self._proxy = None
        # Deleting one end of a veth deletes both, and the routes through it. Do it here:
        # a namespace's own teardown runs later in the kernel, and the next scenario
        # would find the name taken.
        subprocess.run(["ip", "link", "del", f"{self.tag}r"], capture_output=True)
        for name in reversed(self._created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._created.clear()
