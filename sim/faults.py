"""The fault schedule a seed draws, and how each fault is done to the simulated mesh.

Each fault begins at a time, lasts a while, and is undone (a crashed agent starts again as
a new process, a paused one wakes, a cut heals, etcd comes back). Every fault is written
to the history (``fault`` events, as the chaos suite writes them), so the checker knows
which runs a crash or a pause cut short.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from mesh.agent.history import History
from sim.mesh import SimMesh

KINDS = (
    "crash",  # an agent dies at once (SIGKILL) and starts again after a while
    "pause",  # an agent stops for longer than its lease (SIGSTOP), then goes on
    "drain",  # an agent stops gracefully (SIGTERM) and starts again
    "owner-crash",  # the DC's queue owner dies
    "etcd-down",  # a DC's etcd has no quorum: every request fails, watches wait
    "dc-cut",  # the two DCs cannot reach each other
    "agent-cut",  # one agent cannot reach its peers (etcd still can)
    "slow-net",  # every message takes up to 200 ms
    "etcd-unsure",  # a DC's etcd applies the next writes but their callers time out
    "compact",  # a DC's etcd drops its history: watches behind it must list again
    "owner-pause",  # the DC's queue owner stops past its lease, then goes on
    "owner-duty",  # one of the owner's duties ends unasked (a bug, a TaskGroup's cancel)
    "lossy-net",  # a share of messages is lost: calls time out, gossip goes missing
)
PER_DC = {"etcd-down", "dc-cut", "slow-net", "etcd-unsure", "compact", "lossy-net"}
PER_DC |= {kind for kind in KINDS if kind.startswith("owner-")}
OWNER_DUTIES = ("dispatch", "orphans", "reconcile", "watchdog")  # Owner._lead's tasks


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    target: str  # an agent id or a DC
    lasts_s: float

    def __str__(self) -> str:
        return f"{self.kind}({self.target}) at {self.at_s:.1f}s for {self.lasts_s:.1f}s"


def schedule(rng: random.Random, mesh: SimMesh, within_s: float, most: int = 3) -> list[Fault]:
    """Up to ``most`` faults, drawn by ``rng``, each beginning within ``within_s``."""
    faults = []
    for _ in range(rng.randint(0, most)):
        kind = rng.choice(KINDS)
        target = rng.choice(sorted(mesh.dcs if kind in PER_DC else mesh.agents))
        lasts = rng.uniform(1.0, 3.0 * mesh.lease_ttl_s)
        faults.append(Fault(round(rng.uniform(0.5, within_s), 3), kind, target, round(lasts, 3)))
    return sorted(faults, key=lambda f: f.at_s)


async def inflict(mesh: SimMesh, fault: Fault, history: History) -> None:
    """Wait for the fault's time, do it, wait its length, undo it."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, fault.at_s - loop.time()))
    target = fault.target
    if fault.kind.startswith("owner-"):
        target = mesh.owner_of(fault.target) or target
    history.write("fault", "begin", kind=fault.kind, target=target)
    kind = fault.kind.removeprefix("owner-") if target in mesh.agents else fault.kind
    if (do := _DO.get(kind)) is not None:  # none for a DC that has no owner just now
        await do(mesh, target, fault, history)
    history.write("fault", "end", kind=fault.kind, target=target)


async def _crash(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    history.write("fault", "kill", target=target)
    mesh.crash(target)
    await asyncio.sleep(fault.lasts_s)
    mesh.boot(mesh.agents[target])


async def _pause(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    history.write("fault", "stop", target=target)
    mesh.agents[target].endpoint.awake.clear()
    await asyncio.sleep(fault.lasts_s)
    mesh.agents[target].endpoint.awake.set()
    history.write("fault", "cont", target=target)


async def _drain(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    await mesh.drain(target)
    await asyncio.sleep(fault.lasts_s)
    mesh.boot(mesh.agents[target])


async def _duty(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    """One of the owner's term duties is cancelled, though nobody stopped the owner:
    the term must end and the DC get an owner that dispatches again."""
    duty = OWNER_DUTIES[int(fault.lasts_s * 1000) % len(OWNER_DUTIES)]
    for task in mesh.tasks_of(target):
        if task.get_name() == f"owner {duty}":
            history.write("fault", "duty", target=target, duty=duty)
            task.cancel()


async def _etcd_down(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    mesh.stores[target].fail()
    await asyncio.sleep(fault.lasts_s)
    mesh.stores[target].recover()


async def _dc_cut(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    cut = frozenset(mesh.dcs)
    mesh.net.cuts.add(cut)
    await asyncio.sleep(fault.lasts_s)
    mesh.net.cuts.discard(cut)


async def _agent_cut(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    cuts = {frozenset((target, other)) for other in mesh.agents if other != target}
    mesh.net.cuts |= cuts
    await asyncio.sleep(fault.lasts_s)
    mesh.net.cuts -= cuts


async def _unsure(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    mesh.stores[target].unsure = 3
    await asyncio.sleep(fault.lasts_s)
    mesh.stores[target].unsure = 0


async def _compact(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    store = mesh.stores[target]
    store.compact(store.revision)


async def _slow(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    before = mesh.net.delay_s
    mesh.net.delay_s = (0.001, 0.2)
    await asyncio.sleep(fault.lasts_s)
    mesh.net.delay_s = before


async def _lossy(mesh: SimMesh, target: str, fault: Fault, history: History) -> None:
    """A share of every message is lost (between 5% and 30%, from the fault's length)."""
    before = mesh.net.loss
    mesh.net.loss = 0.05 + 0.25 * (fault.lasts_s % 1.0)
    await asyncio.sleep(fault.lasts_s)
    mesh.net.loss = before


_DO = {
    "crash": _crash,
    "pause": _pause,
    "drain": _drain,
    "duty": _duty,
    "etcd-down": _etcd_down,
    "dc-cut": _dc_cut,
    "agent-cut": _agent_cut,
    "etcd-unsure": _unsure,
    "compact": _compact,
    "slow-net": _slow,
    "lossy-net": _lossy,
}
