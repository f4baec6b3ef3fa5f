"""What the process benchmarks share: local meshes torn down after, and polling a condition."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mesh.local.localmesh import LocalMesh, free_port
from mesh.topology import parse

POLL_S = 0.02


@contextmanager
def one_dc(
    prefix: str, agents: list[dict[str, object]], timeout_s: float, **local: object
) -> Iterator[LocalMesh]:
    """A local mesh of one DC named ``dc`` (its own etcd, these agents, ``local`` settings
    of the topology's ``local`` section), torn down after."""
    with local_mesh(
        {
            "prefix": prefix,
            "dcs": {"dc": {}},
            "local": {"model_load_s": 0, "agents": {"dc": agents}, **local},
        },
        timeout_s,
    ) as mesh:
        yield mesh


@contextmanager
def local_mesh(document: dict[str, Any], timeout_s: float) -> Iterator[LocalMesh]:
    """The local mesh a topology document describes, on this machine, torn down after
    and its folder (etcd's data, logs, certificates) removed, unless ``GPUMESH_KEEP``
    is set to look into them; each DC's etcd on a free port (so it runs beside
    ``meshctl up``)."""
    for dc in document["dcs"].values():
        dc["etcd"] = [f"127.0.0.1:{free_port()}"]
    prefix = document["prefix"]
    topology = parse(document, f"{prefix} topology")
    home = Path(tempfile.mkdtemp(prefix=f"gpumesh-{prefix}-"))
    mesh = LocalMesh(topology, home)
    try:
        mesh.up(timeout_s=timeout_s)
        yield mesh
    finally:
        mesh.down()
        if os.environ.get("GPUMESH_KEEP"):
            print(f"kept {home}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(home, ignore_errors=True)


async def until(probe: Callable[[], Awaitable[bool]], limit_s: float = 30.0) -> float:
    """Poll ``probe`` until it holds; return how long that took."""
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > limit_s:
            raise RuntimeError(f"not done within {limit_s:.0f} s")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started
