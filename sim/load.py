"""The simulated clients: users submitting ``sleep`` tasks to any agent, as the chaos
suite's load does, with its history events (``submit`` invoke/ok/fail) for the checker.

A client gives each task its own id, so a Submit answered UNAVAILABLE or not at all can
be sent again, to another agent, without making a second task; it gives up on a task
after a few tries (the checker counts it rejected, and holds the mesh to end it if it
was recorded after all). A tenth of the ids go through both DCs at once (*twins*, a
client retrying through another DC), and those and a share of the rest are watched to
their end, through any agent, resumed on another when one fails (``watch`` events: the
checker holds each to end with its task's state).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from chaos.checker import TERMINAL
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
WATCH = "/mesh.v1.TaskService/Watch"
CANCELLED_SHARE = 0.2  # of the tasks accepted, a user cancels this many, through any agent
TWIN_SHARE = 0.1  # of the ids, submitted through both DCs at once
WATCHED_SHARE = 0.2  # of the other ids, watched to their end
RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
TRIES = 6
WATCH_FOR_S = 300.0  # a watcher resumes this long: past any fault of the schedule and its settling


@dataclass
class Load:
    net: SimNet
    rng: random.Random
    addresses: dict[str, list[str]]  # per DC
    history: History
    client: Endpoint
    accepted: set[str] = field(default_factory=set)
    watching: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(self, tasks: int, every_s: float) -> None:
        """Submit ``tasks`` tasks, one every ``every_s`` seconds on average."""
        sending = []
        for n in range(tasks):
            await asyncio.sleep(self.rng.expovariate(1 / every_s))
            spec = self._spec(f"t{n:05d}")
            if self.rng.random() < TWIN_SHARE:
                sending.append(asyncio.create_task(self._twins(spec)))
            else:
                watch = self.rng.random() < WATCHED_SHARE
                sending.append(asyncio.create_task(self._submit(spec, self._any(), watch)))
        await asyncio.gather(*sending)

    def _any(self) -> list[str]:
        return [a for dc in sorted(self.addresses) for a in self.addresses[dc]]

    def _spec(self, task_id: str) -> pb.TaskSpec:
        spec = pb.TaskSpec(
            task_id=task_id,
            user=pb.User(id=USER.name, group="research"),
            task_type=pb.TASK_TYPE_T2I,
            pipeline="sleep",
            model=self.rng.choice(("sdxl", "flux", "sd3")),
            queue=self.rng.choice(("normal", "normal", "vip")),
        )
        spec.params["seconds"] = str(round(self.rng.uniform(0.05, 2.0), 3))
        spec.params["steps"] = "2"
        spec.deadline.FromSeconds(int(clock.now()) + 3600)
        return spec

    async def _twins(self, spec: pb.TaskSpec) -> None:
        """One id through an agent of each DC at once: the mesh must make one task of it
        (watched once, from the first)."""
        await asyncio.gather(
            *(
                self._submit(spec, self.addresses[dc], watch=i == 0)
                for i, dc in enumerate(sorted(self.addresses))
            )
        )

    async def _submit(self, spec: pb.TaskSpec, addresses: list[str], watch: bool) -> None:
        """Submit through a random one of ``addresses``, again on a retryable error."""
        task_id, seconds = spec.task_id, float(spec.params["seconds"])
        request = pb.SubmitRequest(spec=spec)
        self.history.write("submit", "invoke", key=task_id)
        last = ""
        for _ in range(TRIES):
            address = self.rng.choice(addresses)
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
            if watch:
                self.watching.append(asyncio.create_task(self._watch(task_id)))
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
                    self.rng.choice(self._any()),
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

    async def _watch(self, task_id: str) -> None:
        """Watch to the end through random agents: a stream that breaks is resumed on
        another from the last event's token, as the SDK does."""
        self.history.write("watch", "invoke", key=task_id)
        token, last = "", ""
        until = clock.monotonic() + WATCH_FOR_S
        while clock.monotonic() < until:
            seen: list[pb.TaskEvent] = []
            try:
                await self._stream(pb.WatchRequest(task_id=task_id, resume_token=token), seen)
            except MeshError as exc:
                if exc.code not in RETRYABLE:
                    self.history.write(
                        "watch", "fail", key=task_id, code=exc.code, detail=exc.message
                    )
                    return
                last = f"{exc.code} {exc.message}"
            if seen:
                token = seen[-1].resume_token
                state = pb.TaskState.Name(seen[-1].status.state).removeprefix("TASK_STATE_")
                if state in TERMINAL:
                    self.history.write("watch", "ok", key=task_id, state=state)
                    return
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        self.history.write("watch", "fail", key=task_id, code="gave up", detail=last)

    async def _stream(self, request: pb.WatchRequest, seen: list[pb.TaskEvent]) -> None:
        await self.net.call(
            self.client,
            self.rng.choice(self._any()),
            WATCH,
            lambda apis, grant: _into(apis.tasks.watch(request, grant), seen),
            None,
            identity=USER,
        )


async def _into(events: AsyncIterator[pb.TaskEvent], seen: list[pb.TaskEvent]) -> None:
    """A stream's events, each handed to the client as it comes (a call that times out
    still leaves the client what it was sent)."""
    async for event in events:
        seen.append(event)
