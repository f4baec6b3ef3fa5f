"""One agent: its lifecycle, the router's view, and reading and cancelling tasks.

Start: connect to etcd, open the lease session, read the applied topology, serve gRPC,
register, mirror the peers. Stop (SIGTERM): mark itself draining so peers stop sending,
stop accepting, hand queued tasks to peers at once, let running tasks finish within
``drain_grace_s`` and hand over the rest, revoke the lease (the membership key vanishes
at once), stop the server.

Where tasks go is ``mesh.agent.placement``'s work. The router's view it decides from is kept
here, fed by membership (etcd), gossip and this agent's executor; placement adds the load
every offer reply carries. The gRPC servicers in ``mesh.agent.service`` are thin translations
onto the methods here and on ``placement``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import grpc

from mesh import metrics
from mesh.agent.duties import Duties
from mesh.agent.executor import Executor
from mesh.agent.history import History
from mesh.agent.owner import QueueOwner
from mesh.agent.peers import PeerClients
from mesh.agent.placement import OFFER_TIMEOUT_S, Placement
from mesh.agent.remote import RemoteDcs
from mesh.agent.reporting import RecordReporter
from mesh.config import AgentConfig
from mesh.core import backlog, summaries
from mesh.core.clock import now_ms
from mesh.core.jobs import Job
from mesh.core.queue import Discipline
from mesh.core.router import (
    Member,
    Overflow,
    Policy,
    Router,
)
from mesh.core.task import TERMINAL, public
from mesh.errors import (
    ConfigError,
    MeshError,
    StaleWrite,
    TaskNotFound,
    Unavailable,
)
from mesh.gossip.protocol import GossipConfig, Gossiper
from mesh.gossip.state import AgentState, make_version
from mesh.gossip.transport import GossipNode
from mesh.gossip.wire import Keyring
from mesh.gpus import inventory, weight_of
from mesh.pipelines import Models, load_pipelines
from mesh.store import topostore
from mesh.store.election import Election
from mesh.store.etcd import ETCD_ERRORS, KeySpace, Session, client_for
from mesh.store.mirror import PrefixMirror
from mesh.store.records import TaskStore
from mesh.store.registry import ACTIVE, DRAINING, AgentRecord, Registry
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

INSECURE_GOSSIP_KEY = "gpumesh-insecure-default-gossip-key"


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.keys = KeySpace(cfg.prefix, cfg.dc)
        self.client = client_for(cfg.etcd_endpoints)
        self.history = History(cfg.history, cfg.agent_id, cfg.dc)
        self.session = self._new_session()
        self.store = TaskStore(self.client, self.keys)
        self.registry = Registry(
            self.client, self.keys, lambda: self.session.lease_id, self._members_changed
        )
        self.peers = PeerClients(cfg.max_message_bytes)
        self.remote = RemoteDcs(self.peers)
        self.gpus = inventory(cfg.fake_gpus, cfg.gpu_weights)
        self.pipelines = load_pipelines(cfg)
        self.models = Models(cfg.preloaded_models, self._models_changed)
        self.reporter = RecordReporter(cfg, self.store, lambda: self.session.lease_id, self.history)
        self.executor = Executor(
            cfg, self.gpus, self.pipelines, self.models, self.reporter, self._load_changed
        )
        # Routing state, until an applied topology says otherwise: no overflow, defaults.
        self.router = Router(Policy())
        self.topology: topostore.Applied | None = None
        self.topology_mirror = PrefixMirror(
            self.client, topostore.directory(cfg.prefix), self._topology_changed
        )
        self.summaries_mirror = PrefixMirror(
            self.client, self.keys.summaries, self._summaries_changed
        )
        self.summaries: dict[str, peer_pb2.DcSummary] = {}  # other DCs, as last heard
        self.gpu_weights = dict(cfg.gpu_weights)
        self.gossip = self._gossip_node()
        self.duties = Duties()
        self.placement = Placement(
            cfg,
            self.keys,
            self.store,
            self.router,
            self.registry,
            self.peers,
            self.remote,
            self.executor,
            self.duties.spawn,
            lambda: self.summaries,
        )
        self.owner: QueueOwner | None = None
        self._owner_task: asyncio.Task[None] | None = None
        self.address = ""
        self.gossip_address = ""
        self._incarnation = 0

    def _gossip_node(self) -> GossipNode:
        keys = self.cfg.gossip_keys
        if not keys:
            log.warning("gossip_keys unset: gossip uses a built-in key and is not authenticated")
            keys = [INSECURE_GOSSIP_KEY]
        own = AgentState(
            self.cfg.agent_id, self.cfg.dc, make_version(now_ms(), 0), slots=len(self.gpus)
        )
        config = GossipConfig(
            interval_s=self.cfg.gossip_interval_s,
            fanout=self.cfg.gossip_fanout,
            stale_s=self.cfg.gossip_stale_s,
        )
        keyring = Keyring(tuple(k.encode() for k in keys))
        gossiper = Gossiper(own, keyring, config, self._gossiped, random.Random())
        return GossipNode(
            gossiper, self.cfg.gossip_listen, self._went_quiet, drop_rate=self.cfg.gossip_drop_rate
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, address: str) -> None:
        """Register and begin work; ``address`` is where peers and clients reach us."""
        self.address = address
        try:
            await self.client.connect()
            await self.session.open()
        except MeshError:
            raise
        except Exception as exc:
            raise Unavailable(f"cannot reach etcd at {self.cfg.etcd_endpoints}: {exc}") from exc
        bound = await self.gossip.start()
        self.gossip_address = self.cfg.gossip_advertise or bound
        self.duties.keep("topology", self.topology_mirror.run)
        await asyncio.wait_for(self.topology_mirror.ready.wait(), timeout=10)
        self._incarnation = now_ms()
        await self.registry.publish(self._record())
        self.duties.keep("membership", self.registry.mirror.run)
        self.duties.keep("executor", self.executor.run)
        self.duties.keep("session", self._watch_session)
        self.duties.keep("gossip", self.gossip.run)
        self.duties.keep("summaries", self.summaries_mirror.run)
        self.duties.keep("dc summaries", self._speak_for_the_dc)
        await asyncio.wait_for(self.registry.mirror.ready.wait(), timeout=10)
        self._start_owner()  # after the mirror: an owner must know who is alive
        version = self.topology.version if self.topology else 0
        log.info(
            "agent ready",
            extra={"address": address, "gpus": len(self.gpus), "topology": version},
        )

    def _new_session(self) -> Session:
        def on_state(state: str) -> None:
            self.history.write("lease", state, lease=self.session.lease_id)

        return Session(self.client, self.cfg.lease_ttl_s, self.cfg.etcd_outage_grace_s, on_state)

    def _start_owner(self) -> None:
        """Stand for the DC's queue owner under the current lease."""
        if self._owner_task is not None:
            self._owner_task.cancel()
        election = Election(
            self.client,
            self.keys.election,
            lambda: self.session.lease_id,
            f"{self.cfg.agent_id} {self.address}".encode(),
        )
        self.owner = QueueOwner(
            self.cfg.agent_id,
            election,
            self.store,
            self.keys,
            lambda job: self.placement.place(job, patient=True),
            self.placement.room_for,
            self.router.free_slots,
            self.router.room_left,
            Discipline(self.cfg.queues, self.cfg.queue_aging_s),
            self.cfg.max_attempts,
            self.history,
        )
        self.owner.members_changed(self.registry.peers)
        self._owner_task = self.duties.keep("queue owner", self.owner.run)

    def _record(self, state: str = ACTIVE) -> AgentRecord:
        return AgentRecord(
            agent_id=self.cfg.agent_id,
            dc=self.cfg.dc,
            address=self.address,
            gpus=tuple(self.gpus),
            weight=weight_of(self.gpus, self.gpu_weights),
            pipelines=tuple(sorted(self.pipelines)),
            models=tuple(self.cfg.models),
            models_loaded=tuple(sorted(self.models.loaded)),
            state=state,
            incarnation=self._incarnation,
            queues=tuple(self.cfg.queues),
            queue_limit=self.cfg.max_queue_length,
            gossip_address=self.gossip_address,
        )

    def _models_changed(self) -> None:
        if self.registry.me is not None:
            self.duties.spawn("republish", self._republish())

    async def _republish(self) -> None:
        state = self.registry.me.state if self.registry.me else ACTIVE
        try:
            await self.registry.publish(self._record(state))
        except Unavailable as exc:
            log.warning("could not update agent record: %s", exc)

    # -- the router's view ---------------------------------------------------------------

    def _members_changed(self, records: dict[str, AgentRecord]) -> None:
        self.router.set_members(member_of(r) for r in records.values())
        if self.owner is not None:
            self.owner.members_changed(records)
        self.gossip.gossiper.set_members({a: r.gossip_address for a, r in records.items()})
        for record in records.values():
            if record.agent_id == self.cfg.agent_id:
                continue
            gossiped = self.gossip.gossiper.table.get(record.agent_id)
            if gossiped is None:  # until gossip speaks, the record's list is what we know
                self.router.set_loaded(record.agent_id, record.models_loaded)
        self._load_changed()

    def _load_changed(self) -> None:
        me, executor = self.cfg.agent_id, self.executor
        self.router.set_load(me, executor.running, executor.queued)
        self.router.set_loaded(me, self.models.loaded)
        running, queued = executor.by_class()
        self.gossip.gossiper.update_own(
            slots=executor.slots,
            running=running,
            queued=queued,
            free_memory_mb=executor.free_memory_mb(),
            loaded=tuple(sorted(self.models.loaded)),
            loading=tuple(sorted(self.models.loading)),
            draining=not executor.accepting,
        )
        metrics.RUNNING.set(executor.running)
        metrics.QUEUED.set(executor.queued)
        if self.owner is not None:
            self.owner.capacity_changed()

    def _gossiped(self, state: AgentState) -> None:
        """A newer state of a peer arrived by gossip: its load and models, and it is alive."""
        running, queued = state.tasks
        self.router.set_load(state.agent_id, running, queued)
        self.router.set_loaded(state.agent_id, state.loaded)
        self.router.set_suspect(state.agent_id, False)
        if self.owner is not None:
            self.owner.capacity_changed()

    def _went_quiet(self, agent_ids: list[str]) -> None:
        for agent_id in agent_ids:
            self.router.set_suspect(agent_id, True)

    def load(self) -> peer_pb2.Load:
        return peer_pb2.Load(
            running=self.executor.running,
            queued=self.executor.queued,
            models_loaded=sorted(self.models.loaded),
        )

    def _topology_changed(self, items: dict[str, bytes]) -> None:
        raw = items.get(topostore.CURRENT)
        if raw is None:
            return
        try:
            applied = topostore.Applied.decode(raw, "applied topology")
        except ConfigError as exc:
            log.error("ignoring the applied topology, keeping the current one: %s", exc)
            return
        if self.topology is not None and applied.digest == self.topology.digest:
            return
        self._apply(applied)

    def _apply(self, applied: topostore.Applied) -> None:
        """Switch to a new topology as a whole: it has already been validated."""
        topology, routing = applied.topology, applied.topology.routing
        self.router.set_policy(
            Policy(
                load_factor=routing.load_factor,
                load_floor=routing.load_floor,
                ring_tries=routing.ring_tries,
                affinity_window=routing.affinity_window,
            )
        )
        placement = self.placement
        placement.max_hops = routing.max_hops
        mine = topology.dcs.get(self.cfg.dc)
        placement.overflow = tuple(Overflow(o.dc, o.weight) for o in mine.overflow) if mine else ()
        placement.spill_share.max_share = mine.max_spill_share if mine else 0.0
        self.remote.set_seeds({n: dc.seeds for n, dc in topology.dcs.items() if n != self.cfg.dc})
        if self.cfg.default_queue in topology.queues:
            self.cfg = self.cfg.model_copy(update={"queues": dict(topology.queues)})
            self.executor.reweight(topology.queues)
            if self.owner is not None:
                self.owner.discipline.reweight(topology.queues)
        else:
            log.warning(
                "topology queues lack default_queue %r; queues unchanged", self.cfg.default_queue
            )
        weights = {**topology.gpu_weights, **self.cfg.gpu_weights}
        if weights != self.gpu_weights:
            self.gpu_weights = weights
            self._models_changed()  # republish: our weight changed
        self.topology = applied
        log.info("topology version %d applied", applied.version)

    # -- the DC's queue --------------------------------------------------------------------

    async def queue(self) -> pb.QueueResponse:
        election = Election(self.client, self.keys.election, lambda: 0, b"")
        leader = await election.leader()
        try:
            listing = await self.client.get_prefix(self.keys.backlog)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        names = {kv.key[len(self.keys.backlog) :].decode(): b"" for kv in listing}
        now = now_ms()
        reply = pb.QueueResponse(dc=self.cfg.dc)
        if leader is not None:
            reply.owner, reply.term = leader[0].decode().split()[0], leader[1]
        waiting = backlog.by_class(names)
        for name in sorted({*self.cfg.queues, *waiting}):
            entries = waiting.get(name, [])
            oldest = (now - entries[0].enqueued_ms) / 1000 if entries else 0.0
            reply.classes.add(name=name, depth=len(entries), oldest_wait_s=max(0.0, oldest))
        return reply

    async def drain_now(self) -> None:
        """Take no new tasks (peers see it draining); the ones here run to their end."""
        self.executor.accepting = False
        await self.registry.publish(self._record(DRAINING))

    # -- DC summaries ----------------------------------------------------------------------

    def _summaries_changed(self, items: dict[str, bytes]) -> None:
        decoded = {}
        for dc, raw in items.items():
            try:
                decoded[dc] = summaries.decode(raw)
            except ValueError as exc:
                log.warning("ignoring unreadable summary of DC %s: %s", dc, exc)
        self.summaries = decoded

    def summary(self) -> peer_pb2.DcSummary:
        addresses = {a: r.address for a, r in self.registry.peers.items()}
        return summaries.build(self.cfg.dc, self.router, addresses, now_ms())

    async def summary_received(self, theirs: peer_pb2.DcSummary) -> peer_pb2.DcSummary:
        """Another DC's speaker calls: keep its summary for our DC, answer with ours."""
        if theirs.dc and theirs.dc != self.cfg.dc:
            await self._store_summary(theirs)
        return self.summary()

    async def _store_summary(self, summary: peer_pb2.DcSummary) -> None:
        try:
            await self.client.put(
                self.keys.summary(summary.dc),
                summaries.encode(summary),
                lease=self.session.lease_id,
            )
        except ETCD_ERRORS as exc:
            log.debug("could not store the summary of %s: %s", summary.dc, exc)

    async def _speak_for_the_dc(self) -> None:
        """If this agent is one of its DC's speakers, swap summaries with the other DCs."""
        while True:
            await asyncio.sleep(summaries.INTERVAL_S)
            if not self.executor.accepting or not summaries.speaks(
                self.cfg.agent_id, self.registry.peers
            ):
                continue
            mine = self.summary()
            for dc in self.remote.known():
                try:
                    await self._store_summary(await self.remote.summary(dc, mine))
                except (grpc.aio.AioRpcError, MeshError) as exc:
                    log.debug("no summary from DC %s: %s", dc, exc)

    async def _watch_session(self) -> None:
        """A lost lease means peers think we are dead: come back as a new incarnation.

        Registry and reporter read the lease through ``self.session``, so replacing the
        session is enough. The jobs dropped with the old lease are handed back once the
        new one holds, unless the DC's owner re-queued them meanwhile (it does when the
        lease expired; not when we gave it up during an etcd outage, as the lease may
        still live and hide our death from it).
        """
        while True:
            await self.session.lost.wait()
            if not self.executor.accepting:
                return
            log.error("membership lease lost: dropping my tasks and registering again")
            # The DC's owner re-queues them elsewhere; finishing them here would race it.
            dropped = self.executor.abandon("this agent lost its membership lease")
            await self.session.close(revoke=False)
            self.session = self._new_session()
            try:
                await self.session.open()
                self._incarnation = now_ms()
                await self.registry.publish(self._record())
                self._start_owner()
            except MeshError as exc:
                log.error("re-registration failed: %s; retrying", exc)
                self.session.lost.set()
                await asyncio.sleep(1)
                continue
            self.history.write("lease", "new", lease=self.session.lease_id)
            for job in dropped:
                await self._hand_back(job, after_loss=True)

    async def stop(self, grace_s: float) -> None:
        if not self.executor.accepting:
            return
        with contextlib.suppress(MeshError):
            await self.registry.publish(self._record(DRAINING))
        if self.owner is not None:  # hand the DC's queue over at once
            if self._owner_task is not None:
                self._owner_task.cancel()
                await asyncio.gather(self._owner_task, return_exceptions=True)
            await self.owner.election.resign()
        # Queued jobs go to peers at once, while the running ones get their grace.
        queued = self.executor.close_queue()
        handing = asyncio.gather(*(self._hand_back(job) for job in queued))
        interrupted = await self.executor.drain(grace_s)
        await handing
        for job in interrupted:
            await self._hand_back(job)
        await self.session.close(revoke=True)
        await self.duties.stop()
        await self.peers.close()
        self.gossip.close()
        self.placement.close()
        self.history.close()
        with contextlib.suppress(Exception):
            await self.client.close()

    async def _hand_back(self, job: Job, *, after_loss: bool = False) -> None:
        """Give a job this agent will not finish to a peer; fail it if none takes it.

        A job whose record has moved on (another attempt, or with ``after_loss`` another
        agent) is someone else's now and is left alone.
        """
        interrupted = False
        moved_on = False

        def reset(record: peer_pb2.TaskRecord) -> bool | None:
            nonlocal interrupted, moved_on
            status = record.status
            if status.state in TERMINAL or (after_loss and status.agent != self.cfg.agent_id):
                moved_on = True
                return False
            interrupted = status.state == pb.TASK_STATE_RUNNING
            status.state = pb.TASK_STATE_PENDING
            status.agent = ""
            if interrupted:
                status.attempt += 1
            return None

        try:
            await self.store.update(job.task_id, reset, attempt=job.attempt)
        except StaleWrite:
            return
        except MeshError as exc:
            log.warning("could not hand back %s: %s", job.task_id, exc)
            return
        if moved_on:
            return
        if interrupted:
            job.attempt += 1
        job.path = [*job.path, self.cfg.agent_id]
        try:
            where = await self.placement.place(job)
            log.info("handed back %s", job.task_id)
            self.history.write("handback", "ok", task=job.task_id, attempt=job.attempt, to=where)
        except MeshError as exc:
            log.warning("could not hand back %s: %s", job.task_id, exc)
            await self.placement.fail(
                job, "UNAVAILABLE", f"agent {self.cfg.agent_id} shut down: {exc}"
            )

    # -- submit and placement ------------------------------------------------------------

    def known_pipelines(self) -> set[str]:
        known = set(self.pipelines)
        for peer in self.registry.peers.values():
            known.update(peer.pipelines)
        return known

    # -- reading tasks, wherever they run -------------------------------------------------

    async def get(self, task_id: str) -> pb.TaskStatus:
        stored = await self.store.get(task_id)
        if stored.record.forwarded_to_dc:
            return await self.remote.get(stored.record.forwarded_to_dc, task_id)
        return public(stored.status)

    async def follow(self, task_id: str) -> AsyncIterator[pb.TaskStatus]:
        """The task's statuses until it ends; from its DC's agents if it overflowed."""
        async for stored in self.store.follow(task_id):
            if stored.record.forwarded_to_dc:
                async for status in self.remote.watch(stored.record.forwarded_to_dc, task_id):
                    yield status
                return
            yield public(stored.status)

    # -- cancel --------------------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str) -> pb.TaskStatus:
        def request(record: peer_pb2.TaskRecord) -> bool:
            if record.status.state in TERMINAL or record.cancel_requested:
                return False
            record.cancel_requested = True
            return None

        stored = await self.store.get(task_id)
        if stored.record.forwarded_to_dc:
            return await self.remote.cancel(stored.record.forwarded_to_dc, task_id, reason)
        stored = await self.store.update(task_id, request)
        status = stored.status
        if status.state in TERMINAL or not status.agent:
            if self.owner is not None:
                self.owner.capacity_changed()  # a backlogged task: the owner drops it
            return public(status)
        if status.agent == self.cfg.agent_id:
            return await self.cancel_local(task_id, reason)
        peer = self.registry.peers.get(status.agent)
        if peer is None:
            raise Unavailable("the executing agent is not a member now", agent=status.agent)
        try:
            return await self.peers.cancel_local(
                peer.address, pb.CancelRequest(task_id=task_id, reason=reason), OFFER_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"executing agent unreachable: {exc.code().name}", agent=status.agent
            ) from exc

    async def cancel_local(self, task_id: str, reason: str) -> pb.TaskStatus:
        queued = self.executor.cancel(task_id, reason or "cancelled by user")
        if queued is not None:
            with contextlib.suppress(StaleWrite):
                await self.store.finish(
                    task_id,
                    pb.TASK_STATE_CANCELLED,
                    "CANCELLED",
                    reason or "cancelled by user",
                    attempt=queued.attempt,
                )
        elif not self.executor.holds(task_id):
            stored = await self.store.get(task_id)
            if stored.status.agent != self.cfg.agent_id:
                raise TaskNotFound("task is not on this agent", task_id=task_id)
        # A running task records CANCELLED itself as it unwinds; wait briefly for that.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OFFER_TIMEOUT_S):
                async for stored in self.store.follow(task_id):
                    if stored.status.state in TERMINAL:
                        break
        return public((await self.store.get(task_id)).status)


def member_of(record: AgentRecord) -> Member:
    return Member(
        agent_id=record.agent_id,
        weight=record.weight,
        gpu_memory_mb=tuple(g.memory_mb for g in record.gpus),
        pipelines=frozenset(record.pipelines),
        models=frozenset(record.models),
        draining=record.state == DRAINING,
        queue_limit=record.queue_limit,
    )
