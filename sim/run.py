"""One simulated run per seed: a mesh, a load, a fault schedule, and the checker's verdict.

The seed decides everything: the agents' clock skews and random choices, the network's
delays, the load and the faults. Nothing else enters (no wall clock, no threads, no I/O
but the history files), so the same seed gives the same history byte for byte, and a
failing seed is replayed with ``python -m sim run --seeds N``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from chaos import checker, observe
from chaos.checker import Observed, Verdict
from mesh.agent.history import History
from mesh.core import clock
from mesh.store.keys import KeySpace
from mesh.store.kv import prefix_end
from sim import faults, loop
from sim.clock import SimClock
from sim.load import Load
from sim.mesh import PREFIX, TENANTS, SimMesh
from sim.net import Endpoint

SETTLE_S = 120.0  # after the last fault clears, every accepted task must end within this
WATCHES_S = 60.0  # then every watch must see its task's end within this
EVERY_S = 0.05  # the load submits a task this often, on average


@dataclass
class Outcome:
    seed: int
    tasks: int
    faults: list[str]
    verdict: Verdict
    history_sha256: str
    simulated_s: float
    events: list[checker.Event] = field(repr=False, default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict.ok


def simulate(
    seed: int,
    tasks: int = 200,
    workdir: Path | None = None,
    schedule: list[faults.Fault] | None = None,
) -> Outcome:
    """Run seed ``seed`` on a virtual event loop and check what happened; its files go to
    ``workdir`` (a temporary folder, removed after, by default). ``schedule`` replaces
    the faults the seed would draw (the load and everything else stay the seed's): a
    regression keeps its faults when the kinds of fault grow."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix=f"gpumesh-sim-{seed}-") as folder:
            return simulate(seed, tasks, Path(folder), schedule)
    run = loop.run(_simulate(seed, tasks, workdir, schedule))
    raw = b"".join(sorted(p.read_bytes() for p in workdir.glob("*.jsonl")))
    run.observed.events = _events(workdir)
    return Outcome(
        seed,
        tasks,
        [str(f) for f in run.faults],
        checker.check(run.observed),
        hashlib.sha256(raw).hexdigest(),
        run.simulated_s,
        run.observed.events,
    )


def drawn(seed: int, tasks: int) -> list[faults.Fault]:
    """The fault schedule seed ``seed`` draws for a load of ``tasks``, as ``simulate``
    draws it (after the load's generator, from the mesh's), without running anything."""
    mesh = SimMesh(seed, Path())
    mesh.rng.random()  # the load's generator
    return faults.schedule(random.Random(mesh.rng.random()), mesh, tasks * EVERY_S)


@dataclass
class _Run:
    faults: list[faults.Fault]
    observed: Observed
    simulated_s: float


async def _simulate(seed: int, tasks: int, workdir: Path, given: list[faults.Fault] | None) -> _Run:
    clock.use(SimClock())  # the load's and the fault schedule's clock
    mesh = SimMesh(seed, workdir)
    rng, fault_rng = random.Random(mesh.rng.random()), random.Random(mesh.rng.random())
    await mesh.start()
    history = History(workdir / "load.jsonl", "load", "client")
    client = Endpoint("client", "clients", apis=None, context=None)  # type: ignore[arg-type]
    client.awake.set()
    addresses = {dc: [a.address for a in mesh.agents.values() if a.dc == dc] for dc in mesh.dcs}
    load = Load(mesh.net, rng, addresses, history, client)
    schedule = given if given is not None else faults.schedule(fault_rng, mesh, tasks * EVERY_S)
    done = asyncio.gather(*(faults.inflict(mesh, f, history) for f in schedule))
    await load.run(tasks, EVERY_S)
    await done
    cleared = asyncio.get_running_loop().time()
    await _settle(mesh, load.accepted, SETTLE_S)
    await _watched(load.watching, WATCHES_S)
    records, split = await observe.records(mesh.stores, PREFIX)
    terms = {dc: _terms(mesh, dc) for dc in mesh.dcs}
    membership = {dc: await _members(mesh, dc) for dc in mesh.dcs}
    simulated_s = asyncio.get_running_loop().time()
    mesh.stop()
    history.close()
    observed = Observed(
        events=[],
        records=records,
        terms=terms,
        membership=membership,
        expected={dc: {a for a, s in mesh.agents.items() if s.dc == dc} for dc in mesh.dcs},
        settle_s=simulated_s - cleared,
        split=split,
        fault=(schedule[0].at_s, cleared) if schedule else (0.0, 0.0),
        caps=observe.caps(TENANTS),
    )
    return _Run(schedule, observed, round(simulated_s, 3))


async def _settle(mesh: SimMesh, accepted: set[str], bound_s: float) -> None:
    """Wait, up to ``bound_s`` of simulated time, for every accepted task to end (and
    every recorded one: a Submit its client gave up on may have recorded it) and every
    agent to be a member again (the checker holds the mesh to all three)."""
    deadline = asyncio.get_running_loop().time() + bound_s
    while asyncio.get_running_loop().time() < deadline:
        records, _ = await observe.records(mesh.stores, PREFIX)
        ended = {k for k, r in records.items() if r["state"] in checker.TERMINAL}
        members = {a for dc in mesh.dcs for a in await _members(mesh, dc)}
        if accepted <= ended and ended == records.keys() and members == set(mesh.agents):
            return
        await asyncio.sleep(1.0)


async def _watched(watching: list[asyncio.Task[None]], bound_s: float) -> None:
    """Give the watches still open ``bound_s`` more to see their tasks end; those that
    do not are cancelled, and the checker says they never ended."""
    if watching:
        _, pending = await asyncio.wait(watching, timeout=bound_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _terms(mesh: SimMesh, dc: str) -> list[checker.Term]:
    """The DC's queue-owner terms, from its store's whole history (a compaction drops
    what watches may replay, not what the checker reads)."""
    election = KeySpace(PREFIX, dc).election + b"/"
    audit = mesh.stores[dc].audit
    return observe.terms_from(e for e in audit if e.kv.key.startswith(election))


async def _members(mesh: SimMesh, dc: str) -> set[str]:
    agents = KeySpace(PREFIX, dc).agents
    found = await mesh.stores[dc].range(agents, prefix_end(agents))
    return {kv.key[len(agents) :].decode() for kv in found.kvs}


def _events(workdir: Path) -> list[checker.Event]:
    """Every history event, in time order (the order written, within a time)."""
    events = []
    for path in sorted(workdir.glob("*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(events, key=lambda e: float(e["mono"]))  # type: ignore[arg-type]
