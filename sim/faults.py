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
)


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
        if kind in ("etcd-down", "dc-cut", "slow-net", "owner-crash", "etcd-unsure", "compact"):
            target = rng.choice(sorted(mesh.dcs))
        else:
            target = rng.choice(sorted(mesh.agents))
        lasts = rng.uniform(1.0, 3.0 * mesh.lease_ttl_s)
        faults.append(Fault(round(rng.uniform(0.5, within_s), 3), kind, target, round(lasts, 3)))
    return sorted(faults, key=lambda f: f.at_s)


async def inflict(mesh: SimMesh, fault: Fault, history: History) -> None:
    """Wait for the fault's time, do it, wait its length, undo it."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, fault.at_s - loop.time()))
    target = fault.target
    if fault.kind == "owner-crash":
        target = mesh.owner_of(fault.target) or target
    history.write("fault", "begin", kind=fault.kind, target=target)
    if fault.kind in ("crash", "owner-crash") and target in mesh.agents:
        history.write("fault", "kill", target=target)
        mesh.crash(target)
        await asyncio.sleep(fault.lasts_s)
        mesh.boot(mesh.agents[target])
    elif fault.kind == "pause":
        history.write("fault", "stop", target=target)
        mesh.agents[target].endpoint.awake.clear()
        await asyncio.sleep(fault.lasts_s)
        mesh.agents[target].endpoint.awake.set()
        history.write("fault", "cont", target=target)
    elif fault.kind == "drain":
        await mesh.drain(target)
        await asyncio.sleep(fault.lasts_s)
        mesh.boot(mesh.agents[target])
    elif fault.kind == "etcd-down":
        mesh.stores[target].fail()
        await asyncio.sleep(fault.lasts_s)
        mesh.stores[target].recover()
    elif fault.kind == "dc-cut":
        cut = frozenset(mesh.dcs)
        mesh.net.cuts.add(cut)
        await asyncio.sleep(fault.lasts_s)
        mesh.net.cuts.discard(cut)
    elif fault.kind == "agent-cut":
        cuts = {frozenset((target, other)) for other in mesh.agents if other != target}
        mesh.net.cuts |= cuts
        await asyncio.sleep(fault.lasts_s)
        mesh.net.cuts -= cuts
    elif fault.kind == "etcd-unsure":
        mesh.stores[target].unsure = 3
        await asyncio.sleep(fault.lasts_s)
        mesh.stores[target].unsure = 0
    elif fault.kind == "compact":
        store = mesh.stores[target]
        store.compact(store.revision)
    elif fault.kind == "slow-net":
        before = mesh.net.delay_s
        mesh.net.delay_s = (0.001, 0.2)
        await asyncio.sleep(fault.lasts_s)
        mesh.net.delay_s = before
    history.write("fault", "end", kind=fault.kind, target=target)
