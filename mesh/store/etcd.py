"""The thin etcd adapter: connecting, the key layout, and a lease session.

Everything above this module speaks in records and revisions; only here do we know that
the client is ``aetcd``. aetcd has no background keep-alive, so ``Session`` runs its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aetcd

from mesh.errors import Unavailable

log = logging.getLogger(__name__)

# Low reconnect back-off: otherwise the first writes after an etcd restart fail for ~1 s.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
    "grpc.keepalive_time_ms": 10_000,
}
ETCD_ERRORS = (aetcd.ClientError,)
# What etcd answers when a request never entered its raft log: no member could be reached,
# or the member had no leader (refused at once, thanks to "hasleader" below).
NOT_SENT = ("failed to connect to all addresses", "etcdserver: no leader")


def never_applied(exc: BaseException) -> bool:
    """Whether etcd certainly did not apply the request that failed with ``exc``."""
    return isinstance(exc, aetcd.exceptions.ConnectionFailedError) and any(
        marker in str(exc) for marker in NOT_SENT
    )


class LeaderClient(aetcd.Client):
    """aetcd's client, asking etcd to refuse at once what a member without a leader
    cannot do (etcd's "require leader" metadata), instead of letting the call hang
    until it times out. A refused request never entered the raft log, so the caller
    knows it was not written: without quorum, a submit can go to another DC safely."""

    async def connect(self) -> None:
        await super().connect()
        if ("hasleader", "true") not in (self.metadata or ()):
            self.metadata = (*(self.metadata or ()), ("hasleader", "true"))


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("http://").rpartition(":")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def client_for(endpoints: list[str], timeout_s: float = 5.0) -> aetcd.Client:
    """A client over all members: gRPC's pick-first fails over between IP endpoints.

    aetcd dials ``f"{host}:{port}"``; a multi-address ``ipv4:`` target slips through
    that unchanged. Host names cannot be listed that way, so only the first is used.
    """
    hosts = [_split(e) for e in endpoints]
    if len(hosts) > 1 and all(_is_ip(h) for h, _ in hosts):
        head = ",".join(f"{h}:{p}" for h, p in hosts[:-1])
        last_host, last_port = hosts[-1]
        host, port = f"ipv4:{head},{last_host}", last_port
    else:
        host, port = hosts[0]
    return LeaderClient(
        host=host, port=port, timeout=int(max(1, timeout_s)), options=dict(CHANNEL_OPTIONS)
    )


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Every etcd key the mesh writes, in one place: ``/{prefix}/{dc}/...``."""

    prefix: str
    dc: str

    @property
    def root(self) -> bytes:
        return f"/{self.prefix}/{self.dc}/".encode()

    @property
    def agents(self) -> bytes:
        return self.root + b"agents/"

    def agent(self, agent_id: str) -> bytes:
        return self.agents + agent_id.encode()

    @property
    def tasks(self) -> bytes:
        return self.root + b"tasks/"

    def task(self, task_id: str) -> bytes:
        return self.tasks + task_id.encode()

    @property
    def running(self) -> bytes:
        return self.root + b"running/"

    def running_marker(self, task_id: str) -> bytes:
        return self.running + task_id.encode()

    @property
    def election(self) -> bytes:
        """Candidates for the DC's queue owner: ``etcdctl elect -l`` on it names the owner."""
        return self.root + b"election/queue-owner"

    @property
    def backlog(self) -> bytes:
        return self.root + b"backlog/"

    def backlog_entry(self, queue_class: str, enqueued_ms: int, task_id: str) -> bytes:
        """Sorted by class, then age: the oldest of a class lists first."""
        return self.backlog + f"{queue_class}/{enqueued_ms:013d}-{task_id}".encode()

    @property
    def summaries(self) -> bytes:
        return self.root + b"summaries/"

    def summary(self, dc: str) -> bytes:
        return self.summaries + dc.encode()


class Session:
    """An etcd lease and its keep-alive; ``lost`` is set once the lease cannot be trusted.

    Keys that must vanish with this process (membership, running markers) are written
    under ``lease_id``. The lease is refreshed every TTL/3. It is lost when etcd says it
    expired (this process was paused, or cut off, past the TTL), and only then: while
    etcd cannot be reached at all, or has no quorum, nobody can expire the lease either,
    and etcd renews every lease when a leader returns, so the work under it goes on.
    ``outage_grace_s`` past the TTL the session gives up anyway: an agent cut off from
    an etcd that others still reach must not run tasks they have re-run elsewhere for
    ever. ``on_state`` hears "trouble", "ok" and "lost" as they happen.
    """

    def __init__(
        self,
        client: aetcd.Client,
        ttl_s: int,
        outage_grace_s: float = 0.0,
        on_state: Callable[[str], None] = lambda _: None,
    ) -> None:
        self._client = client
        self.ttl_s = ttl_s
        self._grace_s = outage_grace_s
        self._on_state = on_state
        self.lease_id = 0
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        try:
            lease = await self._client.lease(self.ttl_s)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"cannot grant an etcd lease: {exc}") from exc
        self.lease_id = lease.id
        self._task = asyncio.create_task(self._keep_alive(), name="lease-keepalive")

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        good_until = loop.time() + self.ttl_s
        troubled = False
        while True:
            # After a pause (SIGSTOP, a stalled VM) this wakes at once: the first thing
            # the process does is to ask etcd whether its lease outlived the pause.
            await asyncio.sleep(self.ttl_s / 3)
            sent = loop.time()
            try:
                async with asyncio.timeout(self.ttl_s / 3):  # not wait_for: see owner.py
                    reply = await self._client.refresh_lease(self.lease_id)
            except (TimeoutError, *ETCD_ERRORS) as exc:
                log.warning("lease %x refresh failed: %s", self.lease_id, exc)
                if not troubled:
                    troubled = True
                    self._on_state("trouble")
                if loop.time() >= good_until + self._grace_s:
                    log.error("etcd unreachable %.0fs past the lease TTL", self._grace_s)
                    break
                continue
            if reply is None or reply.TTL <= 0:
                log.error("lease %x expired", self.lease_id)
                break
            if troubled:
                troubled = False
                self._on_state("ok")
            good_until = sent + reply.TTL
        self._on_state("lost")
        self.lost.set()

    async def close(self, revoke: bool = True) -> None:
        """Stop the keep-alive and, by default, revoke the lease so its keys vanish now."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease_id and not self.lost.is_set():
            try:
                await self._client.revoke_lease(self.lease_id)
            except ETCD_ERRORS as exc:
                log.warning("could not revoke lease %x: %s", self.lease_id, exc)
        self.lost.set()


RESUME_BACKOFF_S = (0.1, 0.2, 0.5, 1.0)


async def watch_events(
    client: aetcd.Client, key: bytes, *, prefix: bool, start_revision: int
) -> AsyncIterator[aetcd.Event]:
    """Every event on ``key`` (or under it) from ``start_revision`` on, across broken streams.

    aetcd's watch dies with its connection when etcd restarts; this resumes it from the
    revision after the last event seen, so nothing is missed. Raises
    ``aetcd.RevisionCompactedError`` when history is gone: the caller must list again.
    """
    revision = start_revision
    failures = 0
    open_watch = client.watch_prefix if prefix else client.watch
    while True:
        try:
            watch = await open_watch(key, start_revision=revision)
            try:
                async for event in watch:
                    failures = 0
                    revision = event.kv.mod_revision + 1
                    yield event
            finally:
                with contextlib.suppress(TimeoutError, *ETCD_ERRORS):
                    async with asyncio.timeout(1.0):
                        await watch.cancel()
        except aetcd.RevisionCompactedError:
            raise
        except ETCD_ERRORS as exc:
            delay = RESUME_BACKOFF_S[min(failures, len(RESUME_BACKOFF_S) - 1)]
            failures += 1
            log.warning("watch on %s broke (%s); resuming in %.1fs", key, exc, delay)
            await asyncio.sleep(delay)
