"""A mesh in one process: DCs of agents built by the real composition root over simulated
ports (a ``SimKv`` per DC, the ``SimNet`` between agents, no disk), each agent in a
context of its own (its clock, and every task it starts).

The applied topology is written into every DC's store before the agents start, as
``meshctl topology apply`` does; agents then start as the process would (``Agent.start``)
and stop, crash or pause as the fault schedule says.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.agent.agent import Agent
from mesh.agent.compose import build
from mesh.agent.ports import Ports
from mesh.config import AgentConfig
from mesh.core import chance, clock
from mesh.core.tenants import Tenants
from mesh.store import topostore
from mesh.store.dc import DcStore
from mesh.store.keys import KeySpace
from mesh.store.quota import apply_policy
from mesh.topology import Topology
from sim.clock import SimClock
from sim.kv import Connection, SimKv
from sim.net import Endpoint, SimGossip, SimNet, SimPeers

PREFIX = "sim"
GOSSIP_KEY = "simulated-gossip-key-0123456789"  # no datagram leaves the process
RESTART_S = 2.0  # RestartSec= of deploy/mesh-agent.service
# The load's tenant is capped below a DC's 6 GPUs, so quota slots are taken and given back
# in every seed, and the checker holds each DC to the caps (``checker.check_caps``).
TENANTS = Tenants.model_validate(
    {"groups": {"research": {"max_gpus": 5, "users": {"ada": {"max_gpus": 5}}}}}
)
PROCESS: contextvars.ContextVar[str] = contextvars.ContextVar("sim_process", default="")


@dataclass
class SimAgent:
    agent_id: str
    dc: str
    cfg: AgentConfig
    endpoint: Endpoint
    clock: SimClock
    agent: Agent | None = None
    task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.agent_id}:7000"


@dataclass
class SimMesh:
    seed: int
    workdir: Path
    dcs: dict[str, int] = field(default_factory=lambda: {"west": 3, "east": 3})
    lease_ttl_s: int = 5

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.net = SimNet(random.Random(self.rng.random()))
        self.stores = {dc: SimKv() for dc in self.dcs}
        self.agents: dict[str, SimAgent] = {}
        # Each process's tasks in the order started (never a set: a crash must end them in
        # the same order every run, or the seed would not replay).
        self._tasks: dict[str, dict[asyncio.Task[Any], None]] = defaultdict(dict)
        for dc, count in self.dcs.items():
            for n in range(1, count + 1):
                self._add(f"{dc}-{n}", dc)
        self.topology = Topology(
            prefix=PREFIX,
            dcs={
                dc: {
                    "etcd": [f"{dc}.etcd:2379"],
                    "seeds": [a.address for a in self.agents.values() if a.dc == dc],
                    "overflow": [{"dc": other} for other in self.dcs if other != dc],
                }
                for dc in self.dcs
            },
        )

    def _add(self, agent_id: str, dc: str) -> None:
        cfg = AgentConfig(
            agent_id=agent_id,
            dc=dc,
            prefix=PREFIX,
            insecure=True,
            etcd_endpoints=[f"{dc}.etcd:2379"],
            fake_gpus="2xA100-80GB",
            lease_ttl_s=self.lease_ttl_s,
            history=self.workdir / f"{agent_id}.jsonl",
            result_dir=self.workdir / "results",
            model_load_s=0.5,
            max_queue_length=4,
            etcd_outage_grace_s=10.0,
            gossip_keys=[GOSSIP_KEY],
            loop_lag_tick_s=0.0,  # virtual time is never late
        )
        skew = self.rng.uniform(-0.05, 0.05)
        endpoint = Endpoint(agent_id, dc, apis=None, context=contextvars.copy_context())  # type: ignore[arg-type]
        self.agents[agent_id] = SimAgent(agent_id, dc, cfg, endpoint, SimClock(skew))

    def track(self, loop: asyncio.AbstractEventLoop) -> None:
        """Note which simulated process starts each task, so a crash can end them all."""

        def factory(
            loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context | None = None
        ) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, context=context)
            owner = (context or contextvars.copy_context()).get(PROCESS)
            if owner:
                mine = self._tasks[owner]
                mine[task] = None
                task.add_done_callback(lambda done: mine.pop(done, None))
            return task

        loop.set_task_factory(factory)

    async def start(self) -> None:
        """Apply the topology and the tenants policy in every DC, then start every agent."""
        self.track(asyncio.get_running_loop())
        applied = topostore.Applied(1, topostore.digest(self.topology), self.topology)
        policy = yaml.safe_dump(TENANTS.model_dump(mode="json", exclude_none=True))
        for dc, store in self.stores.items():
            await store.put(topostore.key(PREFIX), applied.encode())
            await apply_policy(store, KeySpace(PREFIX, dc), policy)
        for sim in self.agents.values():
            self.boot(sim)
        await asyncio.gather(*(s.task for s in self.agents.values() if s.task))

    def boot(self, sim: SimAgent) -> None:
        """A fresh process for ``sim``: its parts built anew, then started (one still
        running is ended first: never two processes of one agent)."""
        if sim.agent is not None and sim.endpoint.up:
            self.crash(sim.agent_id)
        context = contextvars.copy_context()
        context.run(clock.use, sim.clock)
        context.run(chance.use, random.Random(self.rng.random()))
        context.run(PROCESS.set, sim.agent_id)
        sim.endpoint.context, sim.endpoint.up = context, True
        sim.endpoint.awake.set()
        store = DcStore(
            Connection(self.stores[sim.dc], sim.endpoint),
            KeySpace(PREFIX, sim.dc),
            sim.cfg.task_retention_s,
            sim.cfg.max_deadline_s,
        )
        ports = Ports(
            store,
            SimPeers(self.net, sim.endpoint),
            lambda gossiper, stale: SimGossip(self.net, sim.endpoint, gossiper, stale),
            random.Random(self.rng.random()),
            disk=False,
        )
        agent = context.run(Agent, sim.cfg, context.run(build, sim.cfg, ports))
        sim.agent = agent
        sim.endpoint.apis = agent.parts.apis
        self.net.endpoints[sim.address] = sim.endpoint
        sim.task = asyncio.create_task(
            self._run(sim, agent), name=f"start {sim.agent_id}", context=context
        )

    async def _run(self, sim: SimAgent, agent: Agent) -> None:
        """Start the agent; one that fails to start exits, and its supervisor starts a
        new process after ``RESTART_S``, as systemd does with the shipped unit."""
        try:
            await agent.start(sim.address, sim.address)
        except Exception:
            self.crash(sim.agent_id)
            asyncio.get_running_loop().call_later(RESTART_S, self._restart, sim)

    def _restart(self, sim: SimAgent) -> None:
        if not sim.endpoint.up:
            self.boot(sim)

    def tasks_of(self, agent_id: str) -> list[asyncio.Task[Any]]:
        """The tasks ``agent_id``'s process runs now, in the order they started."""
        return list(self._tasks.get(agent_id, ()))

    def crash(self, agent_id: str) -> None:
        """The agent's process dies at once: nothing it sends arrives any more, every task
        it started ends, and its lease expires in its time (no one keeps it alive)."""
        sim = self.agents[agent_id]
        sim.endpoint.up = False
        sim.endpoint.awake.set()  # its pending calls fail rather than wait
        self.net.endpoints.pop(sim.address, None)
        for task in list(self._tasks.pop(agent_id, ())):
            task.cancel()
        if sim.agent is not None:
            sim.agent.parts.history.close()  # the process's files close with it

    async def drain(self, agent_id: str) -> None:
        """The agent stops as on SIGTERM (no grace for running tasks), then is gone."""
        sim = self.agents[agent_id]
        if sim.agent is not None and sim.endpoint.up:
            await asyncio.create_task(sim.agent.stop(0.0), context=sim.endpoint.context)
        self.crash(agent_id)

    def owner_of(self, dc: str) -> str | None:
        """The agent that owns ``dc``'s queue now, if one does."""
        for sim in self.agents.values():
            seat = sim.agent.parts.seat if sim.agent else None
            if sim.dc == dc and sim.endpoint.up and seat and seat.owner and seat.owner.leading:
                return sim.agent_id
        return None

    def stop(self) -> None:
        """The end of the simulation: every process goes at once (a graceful stop would
        go on writing after the run was read, for nothing)."""
        for agent_id in sorted(self.agents):
            self.crash(agent_id)
