"""This agent's part in DC summaries: hearing other DCs, and speaking for its own.

Every agent mirrors the summaries its DC's speakers stored in etcd (the router skips DCs
they say are full; overflow reaches the live agents they list). The first few agents by
id speak (``mesh.core.summaries.speaks``): they swap summaries with the other DCs of the
topology over ``PeerService.Summary`` and store what they hear under their lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from mesh.agent.dcs import KnownDcs
from mesh.agent.remote import RemoteDcs
from mesh.core import summaries
from mesh.core.clock import now_ms
from mesh.core.router import Router
from mesh.errors import MeshError, Unavailable
from mesh.store.dc import DcStore
from mesh.store.registry import AgentRecord
from mesh.v1 import peer_pb2

log = logging.getLogger(__name__)


class Speaker:
    def __init__(
        self,
        dc: str,
        agent_id: str,
        store: DcStore,
        known: KnownDcs,
        lease: Callable[[], int],
        router: Router,
        peers: Callable[[], Mapping[str, AgentRecord]],
        remote: RemoteDcs,
        active: Callable[[], bool],
        global_held: Callable[[], Mapping[str, int]] = dict,
        demand: Callable[[], Mapping[str, float]] = dict,
    ) -> None:
        """``peers`` gives the DC's members as the registry sees them; ``active`` whether
        this agent still takes work (a draining agent stops speaking); ``global_held``
        the GPUs each group holds here against its global cap; ``demand`` the work asked
        of the DC per model (``Planning.demand``)."""
        self._dc = dc
        self._agent_id = agent_id
        self._dc_store = store
        self._lease = lease
        self._router = router
        self._peers = peers
        self._remote = remote
        self._active = active
        self._global_held = global_held
        self._demand = demand
        self._known = known  # the other DCs' summaries go there, as last stored
        self.mirror = store.summaries(self._stored)

    def _stored(self, items: Mapping[str, bytes]) -> None:
        decoded = {}
        for dc, raw in items.items():
            try:
                decoded[dc] = summaries.decode(raw)
            except ValueError as exc:
                log.warning("ignoring unreadable summary of DC %s: %s", dc, exc)
        self._known.heard = decoded
        # Other DCs' live agents, for every call there (not only overflow's): an agent
        # that moved since the topology named it is reached at once.
        fresh = summaries.fresh(decoded, now_ms())
        self._remote.set_live({dc: list(s.live) for dc, s in fresh.items()})

    def summary(self) -> peer_pb2.DcSummary:
        """This DC as this agent sees it."""
        peers = self._peers()

        def address(agent_id: str) -> str | None:
            record = peers.get(agent_id)
            return record.peer_address if record else None

        return summaries.build(
            self._dc, self._router, address, now_ms(), self._global_held(), self._demand()
        )

    async def received(self, theirs: peer_pb2.DcSummary) -> peer_pb2.DcSummary:
        """Another DC's speaker calls: keep its summary for our DC, answer with ours."""
        summaries.check(theirs, now_ms())
        if theirs.dc != self._dc:
            await self._store(theirs)
        return self.summary()

    async def _store(self, summary: peer_pb2.DcSummary) -> None:
        if not summaries.worth_storing(summary, self._known.heard.get(summary.dc)):
            return
        try:
            await self._dc_store.put_summary(summary.dc, summaries.encode(summary), self._lease())
        except Unavailable as exc:
            log.debug("could not store the summary of %s: %s", summary.dc, exc)

    async def speak(self) -> None:
        """Forever: while this agent is one of its DC's speakers, swap summaries."""
        while True:
            await asyncio.sleep(summaries.INTERVAL_S)
            if not self._active() or not summaries.speaks(self._agent_id, self._peers()):
                continue
            mine = self.summary()
            for dc in self._remote.known():
                try:
                    await self._store(await self._remote.summary(dc, mine))
                except MeshError as exc:
                    log.debug("no summary from DC %s: %s", dc, exc)
