"""What the process benchmarks share: a one-DC local mesh, and polling a condition."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mesh.local.localmesh import LocalMesh, free_port
from mesh.topology import parse

POLL_S = 0.02


@contextmanager
def one_dc(prefix: str, agents: list[dict[str, object]], timeout_s: float) -> Iterator[LocalMesh]:
    """A local mesh of one DC named ``dc`` (its own etcd, these agents), torn down after."""
    topology = parse(
        {
            "prefix": prefix,
            "dcs": {"dc": {"etcd": [f"127.0.0.1:{free_port()}"]}},
            "local": {"model_load_s": 0, "agents": {"dc": agents}},
        },
        f"{prefix} topology",
    )
    mesh = LocalMesh(topology, Path(tempfile.mkdtemp(prefix=f"gpumesh-{prefix}-")))
    try:
        mesh.up(timeout_s=timeout_s)
        yield mesh
    finally:
        mesh.down()


async def until(probe: Callable[[], Awaitable[bool]], limit_s: float = 30.0) -> float:
    """Poll ``probe`` until it holds; return how long that took."""
    started = time.monotonic()
    while not await probe():
        if time.monotonic() - started > limit_s:
            raise RuntimeError(f"not done within {limit_s:.0f} s")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - started
