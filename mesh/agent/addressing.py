"""One mesh to its users: which DC holds a task, from its id alone.

Every id has a home DC (``mesh.core.home``) that keeps a write-once claim naming the DC
that recorded the task. A Submit claims its id before recording it: the first DC to
claim holds the id, and a Submit of the same id through another DC gets that task back.
``Get``, ``Watch``, ``Cancel`` and ``List`` on an agent whose DC has no record ask the
home which DC has, and forward there.

When the home cannot be asked (its DC is cut off, or its etcd is down), a Submit is not
refused: the task is recorded here with an *unclaimed* mark, in the same transaction, and
the queue owner claims it once the home answers. If another DC claimed the id meanwhile,
the two DCs accepted one id twice while they could not talk; the home's claim wins, and
the task recorded here is cancelled (``gpumesh_duplicate_ids_total`` counts these), with
a reason that names the DC holding the id, if it has not ended already and is not the
very task that DC answers with: a DC that claimed an id and then handed its Submit over
(its etcd failed, or its agents were full) holds the claim of a task that lives here.
When both copies are one submission (the same spec digest: a client retrying through
another DC), Get, Watch, List and results here answer from that DC from then on; when
they are not (another user, or another spec, took the id), this copy stays the answer
here, cancelled. Finding a task also falls back to asking every DC, so it works while
its home is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from mesh import metrics
from mesh.agent.remote import RemoteDcs
from mesh.core import clock, home
from mesh.core.clock import now_ms
from mesh.errors import MeshError, TaskNotFound, Unavailable
from mesh.store.claims import Claim, ClaimStore
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

# The most a call waits on another DC about where a task is. Past it the DC counts as
# away, and a Submit is recorded unclaimed (two DCs may then hold the id): so it must
# outlast a DC that is only busy. Under the chaos burst on two cores, claims were served
# in 0.73 s at most, yet the asking side waited over 1 s.
ASK_S = 3.0
AWAY_S = 2.0  # a DC that did not answer is not asked again for this long
RECONCILE_S = 2.0
RECONCILE_BATCH = 100
# Longer than any Submit takes between claiming an id and recording its task: a claim this
# old whose DC has no record is one whose Submit failed, or whose agent died.
STALE_CLAIM_S = 30.0
RECORDING_WAITS_S = (0.05, 0.1, 0.2, 0.4)  # for a young claim's record to show


@dataclass(frozen=True, slots=True)
class Claimed:
    """A Submit's claim: ``claim`` None when the home cannot be asked now (record with an
    unclaimed mark); ``elsewhere``, the task, when another DC holds the id."""

    claim: Claim | None
    elsewhere: pb.TaskStatus | None = None


class Addressing:
    def __init__(
        self,
        dc: str,
        store: TaskStore,
        claims: ClaimStore,
        remote: RemoteDcs,
        dcs: Callable[[], Iterable[str]],
    ) -> None:
        """``dcs``: the topology's DCs, as this agent knows them now."""
        self.dc = dc
        self._store = store
        self.claims = claims
        self._remote = remote
        self._dcs = dcs
        self._away: dict[str, float] = {}  # DC: until when it is not asked (monotonic)

    def _known(self) -> list[str]:
        return sorted({*self._dcs(), self.dc})

    def home(self, task_id: str) -> str:
        return home.home_dc(task_id, self._known())

    def new_id(self) -> str:
        """An id for a task submitted without one, homed here: no claim travels."""
        return home.id_homed_in(self.dc, self._known())

    # -- claims --------------------------------------------------------------------------

    async def claim(self, task_id: str, digest: str) -> Claimed:
        """Claim ``task_id`` for this DC before recording it. Another DC holding it
        answers for the task; one that holds it but has no record of it (its Submit
        failed, or it died before recording) loses the claim once it is older than any
        Submit takes (until then the caller is asked to retry: it is being recorded)."""
        claim = await self._claim(task_id, digest)
        if claim is None or claim.dc == self.dc:
            return Claimed(claim)
        for wait_s in RECORDING_WAITS_S:  # the first DC may be recording it right now
            try:
                return Claimed(claim, await self._get(claim.dc, task_id))
            except TaskNotFound:
                if now_ms() - claim.at_ms >= STALE_CLAIM_S * 1000:
                    break
            await asyncio.sleep(wait_s)
        else:
            raise Unavailable(
                f"task id {task_id} is being recorded in DC {claim.dc}: retry", dc=claim.dc
            )
        retaken = await self._claim(task_id, digest, stale_holder=claim.dc)
        if retaken is None or retaken.dc != self.dc:
            raise Unavailable(f"task id {task_id} is held by DC {claim.dc}: retry")
        return Claimed(retaken)

    async def _claim(self, task_id: str, digest: str, stale_holder: str = "") -> Claim | None:
        request = peer_pb2.ClaimRequest(
            task_id=task_id, dc=self.dc, spec_digest=digest, stale_holder=stale_holder
        )
        reply = await self._ask_home(task_id, request)
        return None if reply is None else Claim(reply.dc, reply.spec_digest, reply.claimed_at_ms)

    async def _ask_home(
        self, task_id: str, request: peer_pb2.ClaimRequest
    ) -> peer_pb2.ClaimResponse | None:
        """The home's answer, or None if it cannot be had within ``ASK_S``. A home that
        did not answer is not asked again for ``AWAY_S``: while DCs are apart, a Submit
        is accepted at once rather than after a timeout each."""
        where = self.home(task_id)
        try:
            if where == self.dc:
                return await self.answer(request)
            if self._away.get(where, 0.0) > clock.monotonic():
                return None
            async with asyncio.timeout(ASK_S):
                return await self._remote.claim(where, request)
        except (TimeoutError, MeshError) as exc:
            if where != self.dc:
                self._away[where] = clock.monotonic() + AWAY_S
            log.info("home %s of %s cannot be asked now: %r", where, task_id, exc)
            return None

    async def answer(self, request: peer_pb2.ClaimRequest) -> peer_pb2.ClaimResponse:
        """A claim (or a lookup) from an agent of ``request.dc``, for an id homed here."""
        task_id = request.task_id
        if request.lookup:
            found = await self.claims.get(task_id)
        else:
            if request.stale_holder:
                stale_before = now_ms() - STALE_CLAIM_S * 1000
                await self.claims.drop_stale(task_id, request.stale_holder, stale_before)
            found = await self.claims.claim(
                task_id, Claim(request.dc, request.spec_digest, now_ms())
            )
        if found is None:
            return peer_pb2.ClaimResponse(held=False)
        return peer_pb2.ClaimResponse(
            held=True, dc=found.dc, spec_digest=found.digest, claimed_at_ms=found.at_ms
        )

    async def holder(self, task_id: str) -> str | None:
        """The DC its home says recorded ``task_id``; None if unclaimed or unknown now."""
        request = peer_pb2.ClaimRequest(task_id=task_id, dc=self.dc, lookup=True)
        reply = await self._ask_home(task_id, request)
        return reply.dc if reply is not None and reply.held else None

    async def find(self, task_id: str) -> tuple[str, pb.TaskStatus]:
        """The DC that answers for a task this DC has no record of, and the task as it
        answers: the DC its home names first, then every other DC (its home may be cut
        off, or the task may have been recorded where its claim could not reach)."""
        named = await self.holder(task_id)
        others = [dc for dc in home.ranked(task_id, self._known()) if dc not in (self.dc, named)]
        unreachable = []
        for dc in [named, *others] if named and named != self.dc else others:
            try:
                return dc, await self._get(dc, task_id)
            except TaskNotFound:
                continue
            except Unavailable:
                unreachable.append(dc)
        if unreachable:
            raise Unavailable(
                "no DC that answered has this task", task_id=task_id, unreachable=unreachable
            )
        raise TaskNotFound("no such task in any DC", task_id=task_id)

    async def _get(self, dc: str, task_id: str) -> pb.TaskStatus:
        """The task as ``dc`` has it, within ``ASK_S``: a DC cut off is ``Unavailable``
        at once, not after every seed's timeout."""
        if self._away.get(dc, 0.0) > clock.monotonic():
            raise Unavailable(f"DC {dc} did not answer lately", dc=dc)
        try:
            async with asyncio.timeout(ASK_S):
                return await self._remote.get(dc, task_id)
        except (TimeoutError, Unavailable) as exc:
            self._away[dc] = clock.monotonic() + AWAY_S
            raise Unavailable(f"DC {dc} does not answer", dc=dc) from exc

    # -- the queue owner's part ----------------------------------------------------------

    async def reconcile(self, supersede: Callable[[str, str, str], Awaitable[object]]) -> None:
        """Forever: claim the tasks recorded here while their home could not be asked;
        ``supersede(task_id, dc, reason)`` ends one whose id DC ``dc`` holds, and sends
        whoever asks here about it to that DC."""
        while True:
            await asyncio.sleep(RECONCILE_S)
            try:
                pending = await self.claims.unclaimed(RECONCILE_BATCH)
            except MeshError as exc:  # etcd away: this round finds nothing to claim
                log.info("cannot list the claims pending: %s", exc)
                continue
            for task_id in pending:
                try:
                    await self._reconcile_one(task_id, supersede)
                except MeshError as exc:
                    log.info("claim of %s still pending: %s", task_id, exc)

    async def _reconcile_one(
        self, task_id: str, supersede: Callable[[str, str, str], Awaitable[object]]
    ) -> None:
        digest = await self._digest(task_id)
        if digest is None:
            await self.claims.claimed(task_id)  # the record is gone: nothing to claim
            return
        # As a Submit claims: a holder with no record yet may be recording it (asked to
        # retry: next round), and one that never will loses its claim once it is stale.
        claimed = await self.claim(task_id, digest)
        if claimed.claim is None:
            return  # its home still cannot be asked
        holder, theirs = claimed.claim.dc, claimed.elsewhere
        # The holder may have handed its submission to this DC (it spilled here, or its
        # etcd could not take it): this copy is then the task it answers with, not a twin,
        # even while it is itself being handed on (the holder answers with this record,
        # naming the DC it is being handed to: seed 50).
        if holder != self.dc and not (theirs is not None and await self._is_ours(theirs)):
            metrics.DUPLICATE_IDS.inc()
            reason = f"duplicate: DC {holder} recorded task id {task_id} first"
            log.warning("%s; cancelling the copy recorded here", reason)
            # The winner answers for this copy only if it is the same submission (same
            # spec, so the same user): another user's task is never shown in its place.
            same = claimed.claim.digest == digest
            await supersede(task_id, holder if same else "", reason)
        await self.claims.claimed(task_id)

    async def _is_ours(self, theirs: pb.TaskStatus) -> bool:
        """Whether the status another DC answers with is this DC's record of the task."""
        if theirs.dc == self.dc:
            return True
        try:
            mine = (await self._store.get(theirs.task_id)).status
        except TaskNotFound:
            return False
        return bool(mine.agent) and (mine.agent, mine.attempt) == (theirs.agent, theirs.attempt)

    async def _digest(self, task_id: str) -> str | None:
        try:
            return (await self._store.get(task_id)).record.spec_digest
        except TaskNotFound:
            return None
