"""The store port: the DC's etcd as an agent uses it, every adapter over one client.

The agent gets one ``DcStore`` and reaches etcd only through what it builds: task
records, id claims, the backlog, quota slots, the registry, the election, the lease
session, DC summaries and the prefix mirrors of the applied topology and token keys.
None of it lets the client out, and each raises ``Unavailable`` (or ``StaleWrite`` for a
fenced write that lost) rather than the client's own errors. A simulated DC store has
the same shape (``sim``), which the contract tests hold to etcd's behaviour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

from mesh.channels import Security
from mesh.core.tenants import Tenants
from mesh.errors import Unavailable
from mesh.store import topostore
from mesh.store.backlog import Backlog
from mesh.store.claims import ClaimStore
from mesh.store.election import Election
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv
from mesh.store.mirror import PrefixMirror
from mesh.store.quota import QuotaStore, count_preemption, split_policy
from mesh.store.records import TaskStore
from mesh.store.registry import AgentRecord, Registry
from mesh.store.retention import Retention
from mesh.store.session import Session


class DcStore:
    def __init__(
        self,
        store: Kv,
        keys: KeySpace,
        keep_s: float,
        pointer_extra_s: float,
    ) -> None:
        """``store`` is the DC's key-value store (``EtcdKv``, or the simulator's);
        ``keep_s``: how long a finished task's record is kept; ``pointer_extra_s``: how
        much longer a pointer to another DC is (its task may run that much longer)."""
        self._kv = store
        self.keys = keys
        self.retention = Retention(store, keep_s, keep_s / 24, pointer_extra_s)
        self.records = TaskStore(store, keys, self.retention)
        self.claims = ClaimStore(store, keys, self.retention)
        self.backlog = Backlog(store, keys, self.records)

    @classmethod
    def connect_to(
        cls,
        endpoints: list[str],
        security: Security,
        keys: KeySpace,
        keep_s: float,
        pointer_extra_s: float,
    ) -> DcStore:
        """A store over a client of ``endpoints`` (not connected yet: ``connect``)."""
        client = client_for(endpoints, security=security)
        return cls(EtcdKv(client), keys, keep_s, pointer_extra_s)

    async def connect(self) -> None:
        await self._kv.connect()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._kv.close()

    # -- parts that tell their owner of changes -----------------------------------------

    def session(
        self, ttl_s: int, outage_grace_s: float, on_state: Callable[[str], None]
    ) -> Session:
        return Session(self._kv, ttl_s, outage_grace_s, on_state)

    def registry(
        self, lease: Callable[[], int], on_change: Callable[[dict[str, AgentRecord | None]], None]
    ) -> Registry:
        return Registry(self._kv, self.keys, lease, on_change)

    def election(self, lease: Callable[[], int], value: bytes) -> Election:
        """A candidate for the DC's queue owner, under ``lease``."""
        return Election(self._kv, self.keys.election, lease, value)

    def quota(
        self,
        on_change: Callable[[], None],
        on_policy: Callable[[], None],
        dc_slots: Callable[[], Mapping[str, int]],
        held_elsewhere: Callable[[str], int],
    ) -> QuotaStore:
        return QuotaStore(self._kv, self.keys, on_change, on_policy, dc_slots, held_elsewhere)

    def mirror(self, prefix: bytes, on_change: Callable[[dict[str, bytes]], None]) -> PrefixMirror:
        return PrefixMirror(self._kv, prefix, on_change)

    def topology(self, on_change: Callable[[dict[str, bytes]], None]) -> PrefixMirror:
        """The applied topology, as the operator publishes it for every DC."""
        return self.mirror(topostore.directory(self.keys.prefix), on_change)

    def token_keys(self, on_change: Callable[[dict[str, bytes]], None]) -> PrefixMirror:
        """The public keys bearer tokens are checked against."""
        return self.mirror(topostore.token_keys(self.keys.prefix), on_change)

    def summaries(self, on_change: Callable[[dict[str, bytes]], None]) -> PrefixMirror:
        """Other DCs' last summaries, as this DC's speakers stored them."""
        return self.mirror(self.keys.summaries, on_change)

    # -- one-off reads and writes -------------------------------------------------------

    async def leader(self) -> tuple[bytes, int] | None:
        """The queue owner's value and term, as anyone can read them."""
        return await self.election(lambda: 0, b"").leader()

    async def put_summary(self, dc: str, raw: bytes, lease: int) -> None:
        """Keep DC ``dc``'s summary for this DC's agents, for as long as ``lease`` lives."""
        try:
            await self._kv.put(self.keys.summary(dc), raw, lease)
        except Unavailable as exc:
            raise Unavailable(f"cannot store the summary of {dc}: {exc}") from exc

    async def count_preemption(self, group: str) -> None:
        """One more preempted run of ``group``, for people (``meshctl quota show``)."""
        await count_preemption(self._kv, self.keys, group)

    async def split_quota(self, group: str, users: dict[str, int], remove: list[str]) -> Tenants:
        """A group admin's split of its cap, over this DC's policy (compare-and-swap)."""
        return await split_policy(self._kv, self.keys, group, users, remove)
