"""One agent: its lifecycle, and how it places, accepts and cancels tasks.

Start: connect to etcd, open the lease session, serve gRPC, register, mirror the peers.
Stop (SIGTERM): mark itself draining so peers stop sending, stop accepting, let running
tasks finish within ``drain_grace_s``, hand the rest to peers, revoke the lease (the
membership key vanishes at once), stop the server. The gRPC servicers in
``mesh.service`` are thin translations onto the methods here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from mesh import metrics
from mesh.config import AgentConfig
from mesh.errors import MeshError, NoCapacity, StaleWrite, TaskNotFound, Unavailable
from mesh.etcd import KeySpace, Session, client_for
from mesh.executor import Executor, Job
from mesh.gpus import inventory, weight_of
from mesh.peers import PeerClients
from mesh.pipelines import Models, load_pipelines
from mesh.placement import candidates
from mesh.records import Stored, TaskStore, public
from mesh.registry import ACTIVE, DRAINING, AgentRecord, Registry
from mesh.reporting import RecordReporter, now_ts
from mesh.task import TERMINAL, Admitted
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

log = logging.getLogger(__name__)

OFFER_TIMEOUT_S = 2.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.keys = KeySpace(cfg.prefix, cfg.dc)
        self.client = client_for(cfg.etcd_endpoints)
        self.session = Session(self.client, cfg.lease_ttl_s)
        self.store = TaskStore(self.client, self.keys)
        self.registry = Registry(self.client, self.keys, lambda: self.session.lease_id)
        self.peers = PeerClients(cfg.max_message_bytes)
        self.gpus = inventory(cfg.fake_gpus, cfg.gpu_weights)
        self.pipelines = load_pipelines(cfg)
        self.models = Models(cfg.preloaded_models, self._models_changed)
        self.reporter = RecordReporter(cfg, self.store, lambda: self.session.lease_id)
        self.executor = Executor(cfg, self.gpus, self.pipelines, self.models, self.reporter)
        self.address = ""
        self._background: list[asyncio.Task[None]] = []
        self._incarnation = 0

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
        self._incarnation = _now_ms()
        await self.registry.publish(self._record())
        self._spawn(self.registry.mirror.run(), "membership")
        self._spawn(self.executor.run(), "executor")
        self._spawn(self._watch_session(), "session")
        await asyncio.wait_for(self.registry.mirror.ready.wait(), timeout=10)
        log.info("agent ready", extra={"address": address, "gpus": len(self.gpus)})

    def _spawn(self, coro: object, name: str) -> None:
        self._background.append(asyncio.create_task(coro, name=name))  # type: ignore[arg-type]

    def _record(self, state: str = ACTIVE) -> AgentRecord:
        return AgentRecord(
            agent_id=self.cfg.agent_id,
            dc=self.cfg.dc,
            address=self.address,
            gpus=tuple(self.gpus),
            weight=weight_of(self.gpus, self.cfg.gpu_weights),
            pipelines=tuple(sorted(self.pipelines)),
            models=tuple(self.cfg.models),
            models_loaded=tuple(sorted(self.models.loaded)),
            state=state,
            incarnation=self._incarnation,
            queues=tuple(self.cfg.queues),
        )

    def _models_changed(self) -> None:
        if self.registry.me is not None:
            self._spawn(self._republish(), "republish")

    async def _republish(self) -> None:
        state = self.registry.me.state if self.registry.me else ACTIVE
        try:
            await self.registry.publish(self._record(state))
        except Unavailable as exc:
            log.warning("could not update agent record: %s", exc)

    async def _watch_session(self) -> None:
        """A lost lease means peers think we are dead: come back as a new incarnation.

        Registry and reporter read the lease through ``self.session``, so replacing the
        session is enough. Runs already under way keep going here; deciding what becomes
        of them once peers have written them off is the failover issue's work.
        """
        while True:
            await self.session.lost.wait()
            if not self.executor.accepting:
                return
            log.error("membership lease lost; registering again")
            await self.session.close(revoke=False)
            self.session = Session(self.client, self.cfg.lease_ttl_s)
            try:
                await self.session.open()
                self._incarnation = _now_ms()
                await self.registry.publish(self._record())
            except MeshError as exc:
                log.error("re-registration failed: %s; retrying", exc)
                self.session.lost.set()
                await asyncio.sleep(1)

    async def stop(self, grace_s: float) -> None:
        if not self.executor.accepting:
            return
        with contextlib.suppress(MeshError):
            await self.registry.publish(self._record(DRAINING))
        handback = await self.executor.drain(grace_s)
        for job in handback:
            await self._hand_back(job)
        await self.session.close(revoke=True)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.peers.close()
        with contextlib.suppress(Exception):
            await self.client.close()

    async def _hand_back(self, job: Job) -> None:
        """Give a job this agent will not finish to a peer; fail it if none takes it."""
        interrupted = False

        def reset(record: peer_pb2.TaskRecord) -> bool:
            nonlocal interrupted
            if record.status.state in TERMINAL:
                return False
            interrupted = record.status.state == pb.TASK_STATE_RUNNING
            record.status.state = pb.TASK_STATE_PENDING
            record.status.agent = ""
            if interrupted:
                record.status.attempt += 1
            return None

        try:
            await self.store.update(job.task_id, reset, attempt=job.attempt)
            if interrupted:
                job.attempt += 1
            job.path = [*job.path, self.cfg.agent_id]
            await self.place(job)
            log.info("handed back %s", job.task_id)
        except MeshError as exc:
            log.warning("could not hand back %s: %s", job.task_id, exc)
            await self._fail(job, "UNAVAILABLE", f"agent {self.cfg.agent_id} shut down: {exc}")

    async def _fail(self, job: Job, code: str, message: str) -> None:
        def mutate(record: peer_pb2.TaskRecord) -> bool:
            if record.status.state in TERMINAL:
                return False
            record.status.state = pb.TASK_STATE_FAILED
            record.status.finished_at.CopyFrom(now_ts())
            record.status.error.code, record.status.error.message = code, message
            return None

        with contextlib.suppress(MeshError):
            await self.store.update(job.task_id, mutate)

    # -- submit and placement ------------------------------------------------------------

    def known_pipelines(self) -> set[str]:
        known = set(self.pipelines)
        for peer in self.registry.peers.values():
            known.update(peer.pipelines)
        return known

    async def submit(self, admitted: Admitted) -> tuple[Stored, bool]:
        spec = admitted.spec
        status = pb.TaskStatus(
            task_id=spec.task_id,
            state=pb.TASK_STATE_PENDING,
            dc=self.cfg.dc,
            attempt=1,
            created_at=now_ts(),
        )
        status.spec.CopyFrom(spec)
        if len(spec.payload) > self.cfg.inline_payload_bytes:
            status.spec.ClearField("payload")
        status.deadline.FromMilliseconds(admitted.deadline_ms)
        record = peer_pb2.TaskRecord(status=status, spec_digest=admitted.digest)
        stored, created = await self.store.create(record)
        if not created:
            return stored, False
        try:
            await self.place(Job(spec, attempt=1, deadline_ms=admitted.deadline_ms))
        except MeshError:
            with contextlib.suppress(MeshError):
                await self.store.delete(stored)  # never accepted: leave no trace
            raise
        metrics.SUBMITTED.inc()
        return await self.store.get(spec.task_id), True

    async def place(self, job: Job) -> str:
        """Find an agent that takes ``job``: a free slot anywhere first, then any queue."""
        peers = self.registry.peers
        reasons: list[str] = []
        for may_queue in (False, True):
            for agent_id in candidates(job.spec, self.cfg.agent_id, peers.values(), job.path):
                if agent_id == self.cfg.agent_id:
                    accepted, reason = await self.accept(job, may_queue)
                else:
                    accepted, reason = await self._forward(peers[agent_id], job, may_queue)
                if accepted:
                    return agent_id
                reasons.append(f"{agent_id}: {reason}")
        if not reasons:
            raise NoCapacity("no eligible agent in this DC", task_id=job.task_id, retry_after_s=5)
        raise NoCapacity(
            "every eligible agent is full",
            task_id=job.task_id,
            retry_after_s=1,
            refused="; ".join(reasons[-4:]),
        )

    async def _forward(self, peer: AgentRecord, job: Job, may_queue: bool) -> tuple[bool, str]:
        if len(job.path) + 1 > self.cfg.max_hops:
            return False, "hop limit"
        envelope = peer_pb2.Envelope(
            path=[*job.path, self.cfg.agent_id],
            hops=len(job.path) + 1,
            deadline_unix_ms=job.deadline_ms,
            attempt=job.attempt,
            entry_agent=job.path[0] if job.path else self.cfg.agent_id,
            may_queue=may_queue,
        )
        envelope.spec.CopyFrom(job.spec)
        timeout = min(OFFER_TIMEOUT_S, max(0.05, (job.deadline_ms - _now_ms()) / 1000))
        try:
            reply = await self.peers.offer(peer.address, envelope, timeout)
        except grpc.aio.AioRpcError as exc:
            metrics.FORWARDS.labels("error").inc()
            return False, f"unreachable ({exc.code().name})"
        metrics.FORWARDS.labels("accepted" if reply.accepted else "refused").inc()
        return reply.accepted, reply.reason

    async def offer(self, envelope: peer_pb2.Envelope) -> tuple[bool, str]:
        """A peer asks us to run a task: decided by our own live load, not gossip."""
        if self.cfg.agent_id in envelope.path:
            return False, "loop: already visited"
        if envelope.hops > self.cfg.max_hops:
            return False, "hop limit"
        job = Job(envelope.spec, envelope.attempt, envelope.deadline_unix_ms, list(envelope.path))
        accepted, reason = await self.accept(job, envelope.may_queue)
        metrics.OFFERS.labels("accepted" if accepted else "refused").inc()
        return accepted, reason

    async def accept(self, job: Job, may_queue: bool) -> tuple[bool, str]:
        if job.deadline_ms <= _now_ms():
            return False, "deadline passed"
        try:
            self.executor.check(job.spec)
        except MeshError as exc:
            return False, exc.message
        if not may_queue and not self.executor.has_free_slot_for(job.spec):
            return False, "busy"
        # Enqueue before any await, so the check above still holds; the record follows.
        self.executor.enqueue(job)
        self._sync_gauges()

        def mutate(record: peer_pb2.TaskRecord) -> None:
            status = record.status
            status.agent, status.dc = self.cfg.agent_id, self.cfg.dc
            del status.path[:]
            status.path.extend(job.path)
            if status.state == pb.TASK_STATE_PENDING:
                status.state = pb.TASK_STATE_QUEUED
                status.queued_at.CopyFrom(now_ts())

        try:
            await self.store.update(job.task_id, mutate, attempt=job.attempt)
        except MeshError as exc:
            if isinstance(exc, StaleWrite) and await self._runs_here(job):
                return True, "accepted"
            self.executor.cancel(job.task_id, "record refused")
            return False, f"record: {exc.message}"
        return True, "accepted"

    async def _runs_here(self, job: Job) -> bool:
        """Whether the record shows this agent running (or having run) ``job``'s attempt:
        a short task can start, even finish, before the accepting write lands."""
        try:
            status = (await self.store.get(job.task_id)).status
        except MeshError:
            return False
        return status.agent == self.cfg.agent_id and status.attempt == job.attempt

    def _sync_gauges(self) -> None:
        metrics.RUNNING.set(self.executor.running)
        metrics.QUEUED.set(self.executor.queued)

    # -- cancel --------------------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str) -> pb.TaskStatus:
        def request(record: peer_pb2.TaskRecord) -> bool:
            if record.status.state in TERMINAL or record.cancel_requested:
                return False
            record.cancel_requested = True
            return None

        stored = await self.store.update(task_id, request)
        status = stored.status
        if status.state in TERMINAL or not status.agent:
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

            def mutate(record: peer_pb2.TaskRecord) -> None:
                record.status.state = pb.TASK_STATE_CANCELLED
                record.status.finished_at.CopyFrom(now_ts())
                record.status.error.code = "CANCELLED"
                record.status.error.message = reason or "cancelled by user"

            with contextlib.suppress(StaleWrite):
                await self.store.update(task_id, mutate, attempt=queued.attempt)
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
