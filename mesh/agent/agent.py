"""One agent's lifecycle: its parts (``mesh.agent.compose``) started and stopped in order.

Start: connect to etcd, open the lease session, follow the applied topology, register,
mirror the peers, run the executor, gossip and DC summaries, stand for queue owner. Stop
(SIGTERM): mark itself draining so peers stop sending, resign the DC's queue, hand queued
tasks to peers at once, let running tasks finish within ``drain_grace_s`` and hand over
the rest, revoke the lease (the membership key vanishes at once). A lost lease makes it
come back as a new incarnation (``_watch_session``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mesh.agent.compose import Parts, build
from mesh.agent.lag import measure_lag
from mesh.agent.reporting import prune_results
from mesh.config import AgentConfig
from mesh.core.clock import now_ms
from mesh.errors import MeshError, Unavailable
from mesh.store.registry import DRAINING

log = logging.getLogger(__name__)

READY_S = 10.0  # the longest a mirror may take to read its prefix at start


class Agent:
    def __init__(self, cfg: AgentConfig, parts: Parts | None = None) -> None:
        self.cfg = cfg
        self.parts = parts or build(cfg)
        self.stopping = False
        self._handing: asyncio.Future[list[None]] | None = None

    # -- starting ------------------------------------------------------------------------

    async def start(self, address: str, peer_address: str) -> None:
        """Register and begin work; clients reach us at ``address`` (the API port), peers
        and certificate holders at ``peer_address`` (the mTLS port)."""
        p, cfg = self.parts, self.cfg
        p.membership.address, p.membership.peer_address = address, peer_address
        try:
            await p.store.connect()
            await p.membership.session.open()
        except MeshError:
            raise
        except Exception as exc:
            raise Unavailable(f"cannot reach etcd at {cfg.etcd_endpoints}: {exc}") from exc
        bound = await p.gossip.start()
        p.membership.gossip_address = cfg.gossip_advertise or bound
        p.duties.keep("topology", p.topology.run)
        p.duties.keep("token keys", p.token_keys.run)
        await asyncio.wait_for(p.topology.ready.wait(), timeout=READY_S)
        leftovers = await p.handover.release_leftovers(cfg.max_attempts)
        p.membership.incarnation = now_ms()
        # The caps are known before any work can come: peers offer tasks as soon as the
        # record is published, and a task run before the policy is read would take no slot.
        p.duties.keep("quota", p.quota.mirror.run)
        await asyncio.wait_for(p.quota.mirror.ready.wait(), timeout=READY_S)
        await p.membership.publish()
        self._keep_running()
        await asyncio.wait_for(p.membership.registry.mirror.ready.wait(), timeout=READY_S)
        await p.seat.stand()  # after the mirror: an owner must know who is alive
        for job in leftovers.jobs:
            p.duties.spawn(f"re-place {job.task_id}", p.handover.place_leftover(job))
        for stored in leftovers.handoffs:
            settling = p.handover.settle_leftover(stored, cfg.max_attempts)
            p.duties.spawn(f"settle {stored.status.task_id}", settling)
        version = p.view.topology.version if p.view.topology else 0
        log.info(
            "agent ready",
            extra={
                "address": address,
                "peer_address": peer_address,
                "http_url": p.membership.http_url,
                "gpus": len(p.slots),
                "topology": version,
            },
        )

    def _keep_running(self) -> None:
        """The duties that run as long as the agent does."""
        p, keep_s = self.parts, self.cfg.task_retention_s
        p.duties.keep("membership", p.membership.registry.mirror.run)
        p.duties.keep("executor", p.executor.run)
        p.duties.keep("work conservation", p.conserver.run)
        if p.ports.disk:
            p.duties.keep(
                "result retention",
                lambda: prune_results(self.cfg.result_dir, keep_s, min(60.0, keep_s / 4)),
            )
        p.duties.keep("session", self._watch_session)
        if tick_s := self.cfg.loop_lag_tick_s:
            p.duties.keep("loop lag", lambda: measure_lag(tick_s))
        p.duties.keep("gossip", p.gossip.run)
        p.duties.keep("summaries", p.speaker.mirror.run)
        p.duties.keep("dc summaries", p.speaker.speak)
        p.duties.keep("placement plan", p.planning.run)

    async def _watch_session(self) -> None:
        """A lost lease means peers think we are dead: come back as a new incarnation.

        Every part reads the lease through ``Membership.lease_id``, so replacing the
        session is enough. The jobs dropped with the old lease are handed back once the
        new one holds, unless the DC's owner re-queued them meanwhile (it does when the
        lease expired; not when we gave it up during an etcd outage, as the lease may
        still live and hide our death from it).
        """
        p = self.parts
        while True:
            await p.membership.session.lost.wait()
            if self.stopping:
                return
            log.error("membership lease lost: dropping my tasks and registering again")
            # The DC's owner re-queues them elsewhere; finishing them here would race it.
            dropped = p.executor.abandon("this agent lost its membership lease")
            try:
                await p.membership.renew()
                await p.membership.publish()
                await p.seat.stand()
            except MeshError as exc:
                log.error("re-registration failed: %s; retrying", exc)
                p.membership.session.lost.set()
                await asyncio.sleep(1)
                continue
            p.history.write("lease", "new", lease=p.membership.lease_id())
            for job in dropped:
                await p.handover.give_back(job, after_loss=True)

    # -- stopping ------------------------------------------------------------------------

    async def begin_drain(self) -> None:
        """The first step of a stop: peers and clients see this agent draining, the DC's
        queue and this agent's queued jobs go to others at once. It still serves calls
        (and forwards Submits) until ``stop``, so a client in flight is not refused."""
        if self.stopping:
            return
        p = self.parts
        self.stopping = p.membership.stopping = True
        with contextlib.suppress(MeshError):
            await p.membership.publish(DRAINING)
        await p.seat.give_up()  # hand the DC's queue over at once
        queued = p.executor.close_queue()
        self._handing = asyncio.gather(*(p.handover.give_back(job) for job in queued))

    async def stop(self, grace_s: float) -> None:
        """Let running tasks finish within ``grace_s``, hand over the rest, and leave."""
        if not self.stopping:
            await self.begin_drain()
        p = self.parts
        interrupted = await p.executor.drain(grace_s)
        if self._handing is not None:
            await self._handing
        for job in interrupted:
            await p.handover.give_back(job)
        p.leaving.set()
        await asyncio.sleep(0)  # the streams that end now see it before etcd is gone
        await p.membership.session.close(revoke=True)
        await p.duties.stop()
        await p.peers.close()
        p.gossip.close()
        if p.decisions is not None:
            p.decisions.close()
        p.history.close()
        await p.store.close()
