"""The simulated network: agents' calls to each other, and their gossip datagrams.

A call is the other agent's own API facade (``PeerApi`` or ``TaskApi``), run as a task in
that agent's context (its clock, its task tree), after a seeded delay each way; it is
granted as an agent's call is over mTLS (``mesh.core.access.authorize``). A call across a
cut, or to an agent that is down, fails as gRPC would: ``UNAVAILABLE`` at once for a
refused connection, ``DEADLINE_EXCEEDED`` after its timeout for a silent one, or for
one whose request or answer a lossy network dropped (the answer's work was done). An error the
facade raises reaches the caller as the error its status maps to (``error_of``), exactly
as through a real channel, so the caller's code sees what it would see in production.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from mesh.agent.apis import Apis
from mesh.channels import KEEPALIVE_MS
from mesh.core import clock
from mesh.core.access import AGENT, Identity, authorize
from mesh.errors import BadPacket, MeshError, Unavailable
from mesh.gossip.protocol import Datagram, Gossiper
from mesh.sdk.errors import BY_CODE, Internal
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

T = TypeVar("T")
CALL_TIMEOUT_S = 30.0  # a call that names no timeout (a stream) waits at most this
# A stream (no timeout) whose peer went silent fails when the channel's keepalive pings
# go unanswered, as the real channels are set up (``mesh.channels``), not at a deadline.
SILENT_STREAM_S = 2 * KEEPALIVE_MS / 1000


@dataclass
class Endpoint:
    """One simulated process: its API, its context, and whether it runs."""

    agent_id: str
    dc: str
    apis: Apis
    context: contextvars.Context
    up: bool = True  # False once crashed: nothing it sends or is sent arrives
    awake: asyncio.Event = field(default_factory=asyncio.Event)  # cleared while paused
    receive: Callable[[bytes], None] = lambda _: None  # its gossip socket

    async def gate(self) -> None:
        """Hold while the process is paused (its calls go out when it wakes); refuse
        once it crashed (its tasks are being torn down)."""
        await self.awake.wait()
        if not self.up:
            raise Unavailable("the process is gone")


@dataclass
class SimNet:
    """Every agent's address, who can reach whom, and how long a message takes."""

    rng: random.Random
    delay_s: tuple[float, float] = (0.0002, 0.002)
    loss: float = 0.0  # share of messages lost: gossip datagrams, calls' requests and answers
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # address: endpoint
    cuts: set[frozenset[str]] = field(default_factory=set)  # pairs of DCs or agent ids

    def reachable(self, source: Endpoint, target: Endpoint) -> bool:
        pairs = (
            frozenset((source.agent_id, target.agent_id)),
            frozenset((source.dc, target.dc)),
        )
        return target.up and source.up and not any(p in self.cuts for p in pairs)

    def awake(self, endpoint: Endpoint) -> bool:
        return endpoint.up and endpoint.awake.is_set()

    def delay(self) -> float:
        return self.rng.uniform(*self.delay_s)

    def lost(self) -> bool:
        """Whether the next message is lost (no draw while nothing is: a seed without
        this fault draws as it did before it existed)."""
        return self.loss > 0 and self.rng.random() < self.loss

    async def call(
        self,
        source: Endpoint,
        address: str,
        method: str,
        handler: Callable[[Apis, Any], Awaitable[T]],
        timeout_s: float | None,
        identity: Identity | None = None,
    ) -> T:
        """``handler`` on the agent at ``address``, as ``source`` (an agent, unless
        ``identity`` says who) calling ``method``."""
        target = self.endpoints.get(address)
        if target is None:
            raise _error(grpc.StatusCode.UNAVAILABLE, f"no agent listens on {address}")
        limit = timeout_s if timeout_s is not None else CALL_TIMEOUT_S
        deadline = asyncio.get_running_loop().time() + limit
        if not self.reachable(source, target) or self.lost():
            raise await _silence(timeout_s, limit)  # a silent peer, or the request lost
        await source.gate()
        grant = authorize(identity or agent_identity(source), method)
        await asyncio.sleep(self.delay())
        served = asyncio.create_task(
            _translated(_served(target, lambda: handler(target.apis, grant))),
            context=target.context,
        )
        try:
            async with asyncio.timeout(limit):
                reply = await asyncio.shield(served)
        except TimeoutError:
            served.add_done_callback(_unheard)
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except asyncio.CancelledError:
            if not served.cancelled():
                raise  # the caller itself is being cancelled
            raise _error(grpc.StatusCode.UNAVAILABLE, "connection reset") from None
        await asyncio.sleep(self.delay())
        if not self.reachable(source, target):  # the connection broke on the way back
            raise _error(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if self.lost():  # the answer was lost: done there, unknown here
            left = deadline - asyncio.get_running_loop().time()
            raise await _silence(timeout_s, max(0.0, left))
        return reply

    def send(self, source: Endpoint, datagrams: list[Datagram]) -> None:
        """Send gossip datagrams: each delivered after a delay, unless lost or cut."""
        loop = asyncio.get_running_loop()
        for address, data in datagrams:
            target = self.endpoints.get(address)
            lost = self.rng.random() < self.loss
            if target is not None and not lost and self.reachable(source, target):
                loop.call_later(self.delay(), _deliver, target, data)

    def send_from(self, source: Endpoint, datagrams: list[Datagram]) -> None:
        """As ``send``, from a process that may be paused (then nothing goes out)."""
        if self.awake(source):
            self.send(source, datagrams)


def _unheard(served: asyncio.Task[Any]) -> None:
    """A call whose caller stopped waiting: what it ended with goes nowhere, as an
    answer to a gone caller does (read here, so asyncio does not report it as lost)."""
    if not served.cancelled():
        served.exception()


def _deliver(target: Endpoint, data: bytes) -> None:
    if target.up and target.awake.is_set():  # a paused process's socket drops it
        target.context.run(target.receive, data)


def agent_identity(endpoint: Endpoint) -> Identity:
    """Who an agent is to another, as its certificate says."""
    return Identity(AGENT, endpoint.agent_id, dc=endpoint.dc, roles=frozenset({AGENT}))


async def _served(target: Endpoint, work: Callable[[], Awaitable[T]]) -> T:
    """A call handled by ``target`` once it is awake (a paused one answers late)."""
    await target.gate()
    return await work()


async def _translated(work: Awaitable[T]) -> T:
    """What the facade answers, its errors as their status would arrive."""
    try:
        return await work
    except MeshError as exc:
        raise _error(grpc.StatusCode[exc.code], exc.message) from None
    except Exception as exc:  # a bug on the other side: INTERNAL, as the edge says it
        raise Internal(f"internal error: {type(exc).__name__}") from exc


async def _silence(timeout_s: float | None, left_s: float) -> MeshError:
    """Wait out a call nothing answers; the error its caller then sees: a unary call's
    deadline, or a stream's keepalive failing."""
    if timeout_s is None:
        await asyncio.sleep(SILENT_STREAM_S)
        return _error(grpc.StatusCode.UNAVAILABLE, "keepalive watchdog timeout")
    await asyncio.sleep(left_s)
    return _error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


def _error(code: grpc.StatusCode, message: str) -> MeshError:
    return BY_CODE.get(code, Internal)(message)


PEER = "/mesh.v1.PeerService/"
TASKS = "/mesh.v1.TaskService/"


class SimPeers:
    """The peer port (``mesh.agent.peers.Peers``) of one simulated agent."""

    def __init__(self, net: SimNet, me: Endpoint) -> None:
        self._net = net
        self._me = me

    async def _call(self, address: str, method: str, handler: Any, timeout_s: float | None) -> Any:
        return await self._net.call(self._me, address, method, handler, timeout_s)

    async def offer(
        self, address: str, dc: str, envelope: peer_pb2.Envelope, timeout_s: float
    ) -> peer_pb2.OfferResponse:
        return await self._call(
            address, PEER + "Offer", lambda a, g: a.peers.offer(envelope, g), timeout_s
        )

    async def summary(
        self, address: str, dc: str, mine: peer_pb2.DcSummary, timeout_s: float
    ) -> peer_pb2.DcSummary:
        return await self._call(
            address, PEER + "Summary", lambda a, g: a.peers.summary(mine, g), timeout_s
        )

    async def settle(
        self, address: str, dc: str, request: peer_pb2.SettleRequest, timeout_s: float
    ) -> peer_pb2.SettleResponse:
        return await self._call(
            address, PEER + "Settle", lambda a, g: a.peers.settle(request, g), timeout_s
        )

    async def claim(
        self, address: str, dc: str, request: peer_pb2.ClaimRequest, timeout_s: float
    ) -> peer_pb2.ClaimResponse:
        return await self._call(
            address, PEER + "Claim", lambda a, g: a.peers.claim(request, g), timeout_s
        )

    async def run_stage(
        self, address: str, dc: str, request: peer_pb2.StageRequest, timeout_s: float
    ) -> peer_pb2.StageResponse:
        return await self._call(
            address,
            PEER + "RunStage",
            lambda a, g: a.peers.run_stage(request, g, timeout_s),
            timeout_s,
        )

    async def cancel_local(
        self, address: str, dc: str, request: pb.CancelRequest, timeout_s: float
    ) -> pb.TaskStatus:
        return await self._call(
            address, PEER + "CancelLocal", lambda a, g: a.peers.cancel_local(request, g), timeout_s
        )

    async def list(
        self, address: str, dc: str, request: pb.ListRequest, timeout_s: float
    ) -> pb.ListResponse:
        return await self._call(
            address, TASKS + "List", lambda a, g: a.tasks.list(request, g), timeout_s
        )

    async def get(self, address: str, dc: str, task_id: str, timeout_s: float) -> pb.TaskStatus:
        request = pb.GetRequest(task_id=task_id)
        return await self._call(
            address, TASKS + "Get", lambda a, g: a.tasks.get(request, g), timeout_s
        )

    async def cancel(
        self, address: str, dc: str, request: pb.CancelRequest, timeout_s: float
    ) -> pb.TaskStatus:
        return await self._call(
            address, TASKS + "Cancel", lambda a, g: a.tasks.cancel(request, g), timeout_s
        )

    async def rerun(
        self, address: str, dc: str, request: pb.RerunRequest, timeout_s: float
    ) -> pb.SubmitResponse:
        return await self._call(
            address, TASKS + "Rerun", lambda a, g: a.tasks.rerun(request, g), timeout_s
        )

    async def watch(
        self, address: str, dc: str, task_id: str, resume_token: str = ""
    ) -> AsyncIterator[pb.TaskEvent]:
        request = pb.WatchRequest(task_id=task_id, resume_token=resume_token)
        for event in await self._call(
            address, TASKS + "Watch", lambda a, g: _all(a.tasks.watch(request, g)), None
        ):
            yield event

    async def result(self, address: str, dc: str, task_id: str) -> AsyncIterator[pb.ResultChunk]:
        request = pb.GetResultRequest(task_id=task_id)
        for chunk in await self._call(
            address, TASKS + "GetResult", lambda a, g: _all(a.tasks.get_result(request, g)), None
        ):
            yield chunk

    async def fetch_result(
        self, address: str, dc: str, task_id: str
    ) -> AsyncIterator[pb.ResultChunk]:
        request = pb.GetResultRequest(task_id=task_id)
        for chunk in await self._call(
            address,
            PEER + "FetchResult",
            lambda a, g: _all(a.peers.fetch_result(request, g)),
            None,
        ):
            yield chunk

    async def close(self) -> None:
        return None


async def _all(items: AsyncIterator[T]) -> list[T]:
    """A stream read to its end on the serving side (the simulation does not interleave
    a stream's items with other traffic: a watch in the simulation is short)."""
    return [item async for item in items]


class SimGossip:
    """The gossip transport (``mesh.agent.compose.Gossip``) of one simulated agent."""

    def __init__(
        self,
        net: SimNet,
        me: Endpoint,
        gossiper: Gossiper,
        on_stale: Callable[[list[str]], None],
    ) -> None:
        self._net = net
        self._me = me
        self.gossiper = gossiper
        self._on_stale = on_stale
        me.receive = self._received

    async def start(self) -> str:
        return f"gossip:{self._me.agent_id}"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            datagrams, stale = self.gossiper.tick(loop.time(), clock.now_ms())
            self._net.send_from(self._me, datagrams)
            if stale:
                self._on_stale(stale)
            await asyncio.sleep(self.gossiper.config.interval_s)

    def _received(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        try:
            replies = self.gossiper.receive(data, now, clock.now_ms())
        except BadPacket:
            return
        self._net.send_from(self._me, replies)

    def close(self) -> None:
        return None
