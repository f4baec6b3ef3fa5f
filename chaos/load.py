"""The load generator: tasks at a steady rate through the public SDK, as users send them.

Each DC's users hold one ``mesh.sdk.AsyncClient``; it balances over the DC's agents,
retries a Submit that found its agent gone on another with the same task id (the
idempotency key: a retry never makes a second task) and resumes a watch on another agent
when its agent dies. The history records what the caller's code sees, one ``invoke`` per
task and then ``ok`` or ``fail``; the SDK's own tries stay inside it, so ``error_rate``
counts only the errors a user would have had to handle. A tenth of the steady rate's ids
go through both DCs at once (*twins*): one task each, or the checker says why not. Tasks
of the steady rate and of bursts are watched to their end (``watch`` ``ok`` with the
terminal state, or ``fail``); a flood's are not, to keep thousands of streams off a
two-core machine.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Mapping

from google.protobuf.duration_pb2 import Duration

from mesh.agent.history import History
from mesh.channels import Security
from mesh.core.task import state_name
from mesh.errors import MeshError
from mesh.sdk import AsyncClient, Task
from mesh.v1 import tasks_pb2 as pb

TASK_TIMEOUT_S = 120  # generous: a task that fails by deadline is a failure, not a loss
USER = GROUP = "chaos"  # the load's user and its group: its token names both
TWIN_SHARE = 0.1  # of the steady rate's ids, submitted through both DCs at once


class Load:
    def __init__(
        self,
        agents: Mapping[str, Mapping[str, str]],
        history: History,
        rate_per_s: float,
        model: str,
        rng: random.Random,
        security: Security,
        task_s: tuple[float, float] = (0.6, 1.4),
    ) -> None:
        """``agents``: per DC, agent name to address; ``security``: the load's user."""
        self._dcs = sorted(agents)
        self._history = history
        self._interval_s = 1 / rate_per_s
        self._model = model
        self._rng = rng
        self._task_s = task_s
        self._clients = {dc: AsyncClient(list(agents[dc].values()), security) for dc in agents}
        self._inflight: set[asyncio.Task[None]] = set()
        self._watching: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.accepted = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Submit until ``stop`` is set, then wait for the submissions still retrying."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not stop.is_set():
            self._spawn()
            next_at += self._interval_s
            try:
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    await stop.wait()
            except TimeoutError:
                pass
        await asyncio.gather(*self._inflight)

    def burst(self, dc: str, count: int) -> None:
        """``count`` more tasks to ``dc`` at once, beside the steady rate."""
        for _ in range(count):
            self._spawn(dc)

    async def flood(self, count: int, concurrency: int, task_s: tuple[float, float]) -> None:
        """``count`` short tasks to random DCs, at most ``concurrency`` Submits in flight
        at once, beside the steady rate: deep backlogs, fast. Returns once every one of
        them was answered for good (accepted, or given up)."""
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(
            *(self._spawn(gate=gate, task_s=task_s, watch=False) for _ in range(count))
        )

    async def watches_ended(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every watch to end; how many are still open."""
        if self._watching:
            await asyncio.wait(self._watching, timeout=timeout_s)
        return sum(not w.done() for w in self._watching)

    def _spawn(
        self,
        dc: str | None = None,
        gate: asyncio.Semaphore | None = None,
        task_s: tuple[float, float] | None = None,
        watch: bool = True,
    ) -> asyncio.Task[None]:
        self.sent += 1
        key = f"c{self.sent:05d}-{self._rng.randrange(16**6):06x}"
        spec = self._spec(key, task_s or self._task_s)
        if dc is None and watch and self._rng.random() < TWIN_SHARE:
            submit = self._twins(spec)
        else:
            submit = self._submit(spec, dc or self._rng.choice(self._dcs), watch)
        task = asyncio.create_task(self._gated(gate, submit) if gate else submit)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    @staticmethod
    async def _gated(gate: asyncio.Semaphore, submit: Awaitable[None]) -> None:
        async with gate:
            await submit

    def _spec(self, key: str, task_s: tuple[float, float]) -> pb.TaskSpec:
        seconds = self._rng.uniform(*task_s)
        return pb.TaskSpec(
            task_id=key,
            user=pb.User(id=USER),
            task_type=pb.TASK_TYPE_T2I,
            pipeline="sleep",
            model=self._model,
            queue=self._rng.choice(["vip", "normal", "normal"]),
            params={"seconds": f"{seconds:.2f}", "steps": "4"},
            timeout=Duration(seconds=TASK_TIMEOUT_S),
        )

    async def _submit(self, spec: pb.TaskSpec, dc: str, watch: bool) -> None:
        key = spec.task_id
        self._history.write("submit", "invoke", key=key, target_dc=dc)
        try:
            task = await self._clients[dc].submit_spec(spec)
        except MeshError as exc:
            self._history.write("submit", "fail", key=key, code=exc.code, detail=str(exc))
            return
        self._history.write(
            "submit", "ok", key=key, task=task.task_id, dc=task.last.dc if task.last else dc
        )
        self.accepted += 1
        if watch:
            watching = asyncio.create_task(self._watch(task))
            self._watching.add(watching)

    async def _twins(self, spec: pb.TaskSpec) -> None:
        """One task id through every DC at once, as a client retrying through another
        DC would: the mesh must make one task of it (watched once)."""
        await asyncio.gather(
            *(self._submit(spec, dc, watch=i == 0) for i, dc in enumerate(self._dcs))
        )

    async def _watch(self, task: Task) -> None:
        self._history.write("watch", "invoke", key=task.task_id)
        try:
            status = await task.wait()
        except MeshError as exc:
            self._history.write("watch", "fail", key=task.task_id, code=exc.code, detail=str(exc))
            return
        self._history.write("watch", "ok", key=task.task_id, state=state_name(status.state))

    async def close(self) -> None:
        """Abandon the submissions still retrying and the watches still open, then close
        the clients."""
        for task in self._inflight | self._watching:
            task.cancel()
        await asyncio.gather(*self._inflight, *self._watching, return_exceptions=True)
        for client in self._clients.values():
            await client.close()
