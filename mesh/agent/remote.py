"""Other DCs as this agent reaches them: through agents it knows there.

Those are the live agents a fresh summary of the DC lists (least loaded first), then the
topology's seeds. A task that overflows is offered to one of them, which takes it into
its own DC (record and all) and places it there. Its record here then only points to
that DC, and Get, Watch and Cancel are answered by asking an agent of it. Seeds are tried
in an order drawn from the task id, so load on them spreads and a dead seed costs one
timeout.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from mesh.agent.peers import Peers
from mesh.errors import MeshError, TaskNotFound, Unavailable
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT_S = 3.0
# Answers that say "this seed cannot help now, another may": try the next seed.
NEXT_SEED = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


class RemoteDcs:
    def __init__(self, peers: Peers) -> None:
        self._peers = peers
        self._seeds: dict[str, tuple[str, ...]] = {}
        self._live: dict[str, tuple[str, ...]] = {}

    def set_seeds(self, seeds: Mapping[str, list[str]]) -> None:
        self._seeds = {dc: tuple(addresses) for dc, addresses in seeds.items()}

    def set_live(self, live: Mapping[str, list[str]]) -> None:
        self._live = {dc: tuple(addresses) for dc, addresses in live.items()}

    def known(self) -> list[str]:
        return sorted(self._seeds.keys() | self._live.keys())

    def seeds(self, dc: str, task_id: str) -> list[str]:
        """Live agents of ``dc`` as its summary lists them, then its seeds spread by task."""

        def spread(address: str) -> bytes:
            return hashlib.blake2b(f"{task_id}@{address}".encode(), digest_size=8).digest()

        live = list(self._live.get(dc, ()))
        seeds = sorted(set(self._seeds.get(dc, ())) - set(live), key=spread)
        return live + seeds

    async def summary(self, dc: str, mine: peer_pb2.DcSummary) -> peer_pb2.DcSummary:
        return await self._first_answer(
            dc, mine.dc, lambda a: self._peers.summary(a, dc, mine, CALL_TIMEOUT_S)
        )

    async def _first_answer(self, dc: str, task_id: str, call: Callable[[str], Awaitable[T]]) -> T:
        """``call`` on each seed of ``dc`` until one answers; an answer no other seed
        would change (a refusal, not a timeout) passes through."""
        seeds = self.seeds(dc, task_id)
        if not seeds:
            raise Unavailable(f"no seed agent known for DC {dc}", dc=dc)
        last = ""
        for address in seeds:
            try:
                return await call(address)
            except MeshError as exc:
                if exc.code not in NEXT_SEED:
                    raise
                log.info("seed %s of %s: %s", address, dc, exc.code)
                last = exc.code
        raise Unavailable(f"no seed of DC {dc} answered ({last})", dc=dc)

    async def offer(self, dc: str, envelope: peer_pb2.Envelope) -> peer_pb2.OfferResponse:
        """The first answer of a seed of ``dc`` to the offer. A seed that failed may have
        taken it all the same (the offer arrived, its answer did not), so a refusal from
        a later seed proves nothing: it is raised as the earlier failure, and the caller
        settles the hand-off with that DC."""
        doubt: MeshError | None = None

        async def offered(address: str) -> peer_pb2.OfferResponse:
            nonlocal doubt
            try:
                reply = await self._peers.offer(address, dc, envelope, CALL_TIMEOUT_S)
            except MeshError as exc:
                doubt = doubt or exc
                raise
            if not reply.accepted and doubt is not None:
                raise Unavailable(f"refused by {address} after {doubt.code} from another seed")
            return reply

        return await self._first_answer(dc, envelope.spec.task_id, offered)

    async def settle(self, dc: str, task_id: str, origin_dc: str) -> peer_pb2.SettleResponse:
        request = peer_pb2.SettleRequest(task_id=task_id, origin_dc=origin_dc)
        return await self._first_answer(
            dc, task_id, lambda a: self._peers.settle(a, dc, request, CALL_TIMEOUT_S)
        )

    async def claim(self, dc: str, request: peer_pb2.ClaimRequest) -> peer_pb2.ClaimResponse:
        return await self._first_answer(
            dc, request.task_id, lambda a: self._peers.claim(a, dc, request, CALL_TIMEOUT_S)
        )

    async def list(self, dc: str, request: pb.ListRequest) -> pb.ListResponse:
        """One page of ``dc``'s own tasks (its agent, asked by an agent, asks no further)."""
        return await self._translated(
            dc,
            request.user_id,
            lambda a: self._peers.list(a, dc, request, CALL_TIMEOUT_S),
        )

    async def get(self, dc: str, task_id: str) -> pb.TaskStatus:
        return await self._translated(
            dc, task_id, lambda a: self._peers.get(a, dc, task_id, CALL_TIMEOUT_S)
        )

    async def cancel(self, dc: str, task_id: str, reason: str) -> pb.TaskStatus:
        request = pb.CancelRequest(task_id=task_id, reason=reason)
        return await self._translated(
            dc, task_id, lambda a: self._peers.cancel(a, dc, request, CALL_TIMEOUT_S)
        )

    async def rerun(self, dc: str, request: pb.RerunRequest) -> pb.SubmitResponse:
        return await self._translated(
            dc, request.task_id, lambda a: self._peers.rerun(a, dc, request, CALL_TIMEOUT_S)
        )

    async def _translated(self, dc: str, task_id: str, call: Callable[[str], Awaitable[T]]) -> T:
        try:
            return await self._first_answer(dc, task_id, call)
        except Unavailable:
            raise
        except TaskNotFound as exc:
            raise TaskNotFound(f"not found in DC {dc}", task_id=task_id) from exc
        except MeshError as exc:
            raise Unavailable(f"DC {dc}: {exc.code}: {exc.message}") from exc

    async def result(self, dc: str, task_id: str) -> AsyncIterator[pb.ResultChunk]:
        """A task's result, from an agent of ``dc`` (which reads it where it is)."""

        def opened(address: str) -> AsyncIterator[pb.ResultChunk]:
            return self._peers.result(address, dc, task_id)

        async for chunk in self._streamed(dc, task_id, opened, resumes=False):
            yield chunk

    async def watch(
        self, dc: str, task_id: str, resume_token: str = ""
    ) -> AsyncIterator[pb.TaskEvent]:
        """The task's events as an agent of ``dc`` streams them, until it ends; a broken
        stream resumes on the next agent after the last event seen."""

        def opened(address: str) -> AsyncIterator[pb.TaskEvent]:
            return self._peers.watch(address, dc, task_id, resume_token)  # the latest token

        async for event in self._streamed(dc, task_id, opened, resumes=True):
            resume_token = event.resume_token
            yield event

    async def _streamed(
        self, dc: str, task_id: str, opened: Callable[[str], AsyncIterator[T]], resumes: bool
    ) -> AsyncIterator[T]:
        """A stream from one agent of ``dc`` after another until one ends it; a stream
        that broke after its first item goes on elsewhere only if it ``resumes`` (a
        result restarted elsewhere would repeat its first chunks)."""
        for address in self.seeds(dc, task_id):
            started = False
            try:
                async for item in opened(address):
                    started = True
                    yield item
                return
            except MeshError as exc:
                if isinstance(exc, TaskNotFound) and not started:
                    raise TaskNotFound(f"DC {dc} has no such task", task_id=task_id) from exc
                if exc.code not in NEXT_SEED or (started and not resumes):
                    raise Unavailable(f"DC {dc}: {exc.code}: {exc.message}") from exc
        raise Unavailable(f"no seed of DC {dc} answered", dc=dc)
