"""The load generator: tasks at a steady rate to random agents, retried as a client would.

Each task's id is its idempotency key, drawn once; every retry sends the same id, so a
Submit that reached etcd before its answer was lost returns the task it created rather
than a second one. Retries stay in the DC first chosen: ids are unique per DC's etcd,
so a retry sent to another DC could create a second task. ``UNAVAILABLE``,
``DEADLINE_EXCEEDED`` and ``RESOURCE_EXHAUSTED`` are retried with backoff (to another
agent of the DC), within a bounded number of tries; anything else is final. Every try
and its answer goes to the history, stamped with the shared monotonic clock.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Mapping

import grpc
from google.protobuf.duration_pb2 import Duration

from mesh.agent.history import History
from mesh.channels import Security
from mesh.client import MeshClient
from mesh.v1 import tasks_pb2 as pb

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MAX_TRIES = 6
SUBMIT_TIMEOUT_S = 5.0
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 2.0)
TASK_TIMEOUT_S = 120  # generous: a task that fails by deadline is a failure, not a loss
USER = "chaos"  # the load's user: its token names it


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
        self._agents = agents
        self._history = history
        self._interval_s = 1 / rate_per_s
        self._model = model
        self._rng = rng
        self._task_s = task_s
        self._clients = {
            address: MeshClient(address, security)
            for dc in agents.values()
            for address in dc.values()
        }
        self._inflight: set[asyncio.Task[None]] = set()
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
        """``count`` short tasks to random agents of both DCs, at most ``concurrency``
        Submits in flight at once, beside the steady rate: deep backlogs, fast. Returns
        once every one of them was answered for good (accepted, or given up)."""
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(self._spawn(gate=gate, task_s=task_s) for _ in range(count)))

    def _spawn(
        self,
        dc: str | None = None,
        gate: asyncio.Semaphore | None = None,
        task_s: tuple[float, float] | None = None,
    ) -> asyncio.Task[None]:
        self.sent += 1
        key = f"c{self.sent:05d}-{self._rng.randrange(16**6):06x}"
        spec = self._spec(key, task_s or self._task_s)
        submit = self._submit(spec, dc or self._rng.choice(sorted(self._agents)))
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

    async def _submit(self, spec: pb.TaskSpec, dc: str) -> None:
        key = spec.task_id
        names = list(self._agents[dc])
        self._rng.shuffle(names)
        for attempt in range(MAX_TRIES):
            name = names[attempt % len(names)]
            self._history.write("submit", "invoke", key=key, target=name, target_dc=dc)
            try:
                reply = await self._clients[self._agents[dc][name]].submit(
                    spec, timeout_s=SUBMIT_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                final = code not in RETRYABLE or attempt == MAX_TRIES - 1
                self._history.write(
                    "submit", "fail" if final else "error", key=key, target=name,
                    code=code.name, detail=exc.details(),
                )  # fmt: skip
                if final:
                    return
                await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                continue
            self._history.write(
                "submit", "ok", key=key, task=reply.status.task_id, target=name,
                dc=reply.status.dc, existing=reply.existing,
            )  # fmt: skip
            self.accepted += 1
            return

    async def close(self) -> None:
        """Abandon the submissions still retrying, then close the channels."""
        for task in self._inflight:
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        for client in self._clients.values():
            await client.close()
