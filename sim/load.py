"""The simulated clients: users submitting ``sleep`` tasks to any agent, as the chaos
suite's load does, with its history events (``submit`` invoke/ok/fail) for the checker.

A client gives each task its own id, so a Submit answered UNAVAILABLE or not at all can
be sent again, to another agent, without making a second task; it gives up on a task
after a few tries (the checker counts it rejected, and holds the mesh to end it if it
was recorded after all).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from mesh.agent.history import History
from mesh.core import clock
from mesh.core.access import Identity
from mesh.errors import MeshError
from mesh.local.trust import LOAD_ROLES
from mesh.v1 import tasks_pb2 as pb
from sim.net import Endpoint, SimNet

USER = Identity("user", "ada", groups=("research",), roles=frozenset(LOAD_ROLES))
SUBMIT = "/mesh.v1.TaskService/Submit"
CANCEL = "/mesh.v1.TaskService/Cancel"
CANCELLED_SHARE = 0.2  # of the tasks accepted, a user cancels this many, through any agent
RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
TRIES = 6


@dataclass
class Load:
    net: SimNet
    rng: random.Random
    addresses: list[str]
    history: History
    client: Endpoint
    accepted: set[str] = field(default_factory=set)

    async def run(self, tasks: int, every_s: float) -> None:
        """Submit ``tasks`` tasks, one every ``every_s`` seconds on average."""
        sending = []
        for n in range(tasks):
            await asyncio.sleep(self.rng.expovariate(1 / every_s))
            seconds = round(self.rng.uniform(0.05, 2.0), 3)
            sending.append(asyncio.create_task(self._submit(f"t{n:05d}", seconds)))
        await asyncio.gather(*sending)

    async def _submit(self, task_id: str, seconds: float) -> None:
        spec = pb.TaskSpec(
            task_id=task_id,
            user=pb.User(id=USER.name, group="research"),
            task_type=pb.TASK_TYPE_T2I,
            pipeline="sleep",
            model=self.rng.choice(("sdxl", "flux", "sd3")),
            queue=self.rng.choice(("normal", "normal", "vip")),
        )
        spec.params["seconds"] = str(seconds)
        spec.params["steps"] = "2"
        spec.deadline.FromSeconds(int(clock.now()) + 3600)
        request = pb.SubmitRequest(spec=spec)
        self.history.write("submit", "invoke", key=task_id)
        last = ""
        for _ in range(TRIES):
            address = self.rng.choice(self.addresses)
            try:
                reply = await self.net.call(
                    self.client,
                    address,
                    SUBMIT,
                    lambda apis, grant: apis.tasks.submit(request, grant),
                    10.0,
                    identity=USER,
                )
            except MeshError as exc:
                if exc.code not in RETRYABLE:
                    self.history.write(
                        "submit", "fail", key=task_id, code=exc.code, why=exc.message
                    )
                    return
                last = exc.code
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                continue
            self.accepted.add(task_id)
            status = reply.status
            state = pb.TaskState.Name(status.state).removeprefix("TASK_STATE_")
            self.history.write(
                "submit",
                "ok",
                key=task_id,
                to=address,
                state=state,
                dc=status.dc or None,
                existing=reply.existing or None,
            )
            if self.rng.random() < CANCELLED_SHARE:
                await asyncio.sleep(self.rng.uniform(0.0, seconds * 1.5))
                await self._cancel(task_id)
            return
        self.history.write("submit", "fail", key=task_id, code=last, why="gave up")

    async def _cancel(self, task_id: str) -> None:
        """Cancel through a random agent, as a user who does not know where it runs;
        the state the answer shows is the checker's to hold the mesh to."""
        request = pb.CancelRequest(task_id=task_id, reason="sim")
        self.history.write("cancel", "invoke", key=task_id)
        for _ in range(TRIES):
            try:
                status = await self.net.call(
                    self.client,
                    self.rng.choice(self.addresses),
                    CANCEL,
                    lambda apis, grant: apis.tasks.cancel(request, grant),
                    10.0,
                    identity=USER,
                )
            except MeshError as exc:
                if exc.code not in RETRYABLE:
                    self.history.write("cancel", "fail", key=task_id, code=exc.code)
                    return
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                continue
            state = pb.TaskState.Name(status.state).removeprefix("TASK_STATE_")
            self.history.write("cancel", "ok", key=task_id, state=state)
            return
        self.history.write("cancel", "fail", key=task_id, code="gave up")
