"""The thin etcd adapter: connecting, what a failed call means, and watches that resume.

Everything above ``mesh.store`` speaks in records and revisions; only here do we know
that the client is ``aetcd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import aetcd.rpc
import aetcd.transactions
import grpc

from mesh.channels import Security
from mesh.store.watcher import KeyedWatcher
from mesh.trust.pki import etcd_host

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
        if self._connected.is_set():
            return
        await super().connect()  # no user name: nothing awaited, so nothing watched yet
        self.metadata = (*(self.metadata or ()), ("hasleader", "true"))
        self._watcher = KeyedWatcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )


class TlsClient(LeaderClient):
    """The same client over TLS, with a client certificate (etcd's ``--client-cert-auth``
    takes its CN as the user for RBAC).

    aetcd 1.0's ``connect()`` always opens a plaintext channel. This replaces that one
    step and keeps the rest of aetcd as it is (a subclass, not a fork: upgrading aetcd
    stays an upgrade): the stubs and the watcher are built on the secure channel exactly
    as ``connect()`` builds them. Members are verified against ``etcd.<mesh>``, a name
    every member's certificate carries, whichever address was dialled.
    """

    def __init__(self, *, security: Security, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._security = security

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = [
            *self._options.items(),
            ("grpc.ssl_target_name_override", etcd_host(self._security.mesh)),
        ]
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", self._security.credentials(), options=options
        )
        self.metadata = (("hasleader", "true"),)
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = KeyedWatcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class LeaseIs(aetcd.transactions.BaseCompare):
    """The comparison aetcd lacks: the key is held under this lease (``== lease_id``;
    a key that does not exist compares as lease 0). etcd 3.3 and later."""

    def build_compare(self, compare: Any) -> None:
        compare.target = aetcd.rpc.Compare.LEASE
        compare.lease = int(self.value)


def stub_options(client: aetcd.Client) -> dict[str, Any]:
    """The timeout and metadata aetcd gives its own calls, for the few etcd calls it has
    no method for (a limited range, the Auth service), made with its generated stubs."""
    return {"timeout": client._timeout, "metadata": client.metadata}


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("http://").rpartition(":")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def client_for(
    endpoints: list[str], timeout_s: float = 5.0, security: Security | None = None
) -> aetcd.Client:
    """A client over all members: gRPC's pick-first fails over between IP endpoints.
    Over TLS with ``security``'s client certificate, unless it is insecure.

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
    settings = {
        "host": host,
        "port": port,
        "timeout": int(max(1, timeout_s)),
        "options": dict(CHANNEL_OPTIONS),
    }
    if security is None or security.insecure:
        return LeaderClient(**settings)
    return TlsClient(security=security, **settings)


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
