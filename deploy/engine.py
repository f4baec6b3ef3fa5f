"""A container engine through the Docker Engine API, with the ``docker`` SDK.

The engine is whatever answers that API: Docker's daemon, or podman's API service
(``podman system service``), which is what runs here (STACK-NOTES: podman with runc; no
image registry is reachable). It is found at ``DOCKER_HOST`` if set, else at the usual
local sockets. Nothing here pulls an image: every image is built from a local context,
so a fleet runs where no registry can be reached.

Every image, container, volume and network this project makes carries the ``LABEL``
label, with its owner (a test session, a rehearsal), so that what a run left behind (one
killed mid-way) can be found and removed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from mesh.errors import Unavailable

LABEL = "io.gpumesh.owner"
SOCKETS = (
    "/var/run/docker.sock",
    "/run/podman/podman.sock",
    f"/run/user/{os.getuid()}/podman/podman.sock",
)
PING_S = 5
ETCD_IN_IMAGE = "/usr/local/bin/etcd"
# As the public etcd image has it (no entrypoint: a command names the program), so that a
# Compose file written for that image runs this one unchanged.
ETCD_DOCKERFILE = """\
FROM {base}
COPY etcd etcdctl /usr/local/bin/
CMD ["{etcd}"]
"""
CONTAINERS_CONF = """\
[engine]
runtime = "runc"
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
"""
START_S = 20
API_S = 300  # a build or a wait may take minutes; a ping does not (PING_S)
STOP_S = 5
UNREACHABLE = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


@dataclass(frozen=True)
class Engine:
    """An engine that answered, and where."""

    client: docker.DockerClient
    url: str

    @property
    def name(self) -> str:
        version = self.client.version()
        components = [c.get("Name", "") for c in version.get("Components", [])]
        kind = "podman" if any("Podman" in c for c in components) else "docker"
        return f"{kind} {version.get('Version', '?')} at {self.url}"

    def image_exists(self, tag: str) -> bool:
        try:
            self.client.images.get(tag)
        except docker.errors.ImageNotFound:
            return False
        return True

    def build(self, context: Mapping[str, bytes | Path], tag: str, **options: object) -> str:
        """Build ``tag`` from files given as name → bytes or host path (a tarball is sent,
        so nothing outside it reaches the build); the image id."""
        image, _ = self.client.images.build(
            fileobj=_tarball(context), custom_context=True, tag=tag, rm=True, **options
        )
        return str(image.id)

    def leftovers(self, owner: str) -> list[Container]:
        return self.client.containers.list(all=True, filters={"label": f"{LABEL}={owner}"})

    def remove(self, container: Container) -> None:
        """Remove ``container`` and its anonymous volumes, running or not; gone already is
        fine."""
        with suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)


class PodmanService:
    """podman's Docker API service on a socket of its own, for a session that found no
    engine: with runc and ulimits within this machine's (STACK-NOTES: podman's default
    runtime, crun, cannot set them here), from a ``containers.conf`` written beside it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "podman.sock"
        self._conf = folder / "containers.conf"
        self._log = folder / "podman.log"
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("podman") is not None and shutil.which("runc") is not None

    def start(self) -> Engine:
        self._conf.write_text(CONTAINERS_CONF)
        env = {**os.environ, "CONTAINERS_CONF": str(self._conf)}
        argv = ["podman", "system", "service", "--time=0", f"unix://{self.socket}"]
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and self._process.poll() is None:
            if self.socket.exists() and (engine := connect(f"unix://{self.socket}")):
                return engine
            time.sleep(0.1)
        self.stop()
        raise Unavailable(f"podman's API service did not start; see {self._log}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def connect(url: str | None = None) -> Engine | None:
    """The engine at ``url``, else at ``DOCKER_HOST``, else at a local socket; None if none
    answers."""
    if url or (url := os.environ.get("DOCKER_HOST")):
        urls = [url]
    else:
        urls = [f"unix://{path}" for path in SOCKETS if Path(path).exists()]
    for candidate in urls:
        try:
            client = docker.DockerClient(base_url=candidate, timeout=PING_S)
            client.ping()
        except UNREACHABLE:
            continue
        client.api.timeout = API_S
        return Engine(client, candidate)
    return None


@contextmanager
def serving() -> Iterator[Engine | None]:
    """The engine that answers; else podman's API service, started for the block and
    stopped after it (with its folder); None where neither can be had."""
    if (engine := connect()) is not None or not PodmanService.available():
        yield engine
        return
    service = PodmanService(Path(tempfile.mkdtemp(prefix="gpumesh-engine-")))
    try:
        yield service.start()
    finally:
        service.stop()
        shutil.rmtree(service.folder, ignore_errors=True)


def etcd_image(engine: Engine, etcd: Path, base: str = "scratch") -> str:
    """A tag for an image of the static ``etcd`` (and the ``etcdctl`` beside it) on
    ``base`` (nothing at all, or one with a shell for a healthcheck), built once per
    binary and base: no registry needed."""
    digest = hashlib.sha256(etcd.read_bytes() + base.encode()).hexdigest()[:12]
    tag = f"localhost/gpumesh-etcd:{digest}"
    if not engine.image_exists(tag):
        files: dict[str, bytes | Path] = {
            "Dockerfile": ETCD_DOCKERFILE.format(base=base, etcd=ETCD_IN_IMAGE).encode(),
            "etcd": etcd,
            "etcdctl": etcd.with_name("etcdctl"),
        }
        engine.build(files, tag, labels={LABEL: "etcd"})
    return tag


def require(engine: Engine | None, why: str) -> Engine:
    if engine is None:
        raise Unavailable(
            f"{why} needs a container engine: set DOCKER_HOST, or install podman and runc"
        )
    return engine


def _tarball(context: Mapping[str, bytes | Path]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in sorted(context.items()):
            if isinstance(content, Path):
                tar.add(content, arcname=name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    out.seek(0)
    return out
