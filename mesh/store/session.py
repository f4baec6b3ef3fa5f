"""An etcd lease and its keep-alive: what makes keys vanish with the process that wrote
them. The store has no background keep-alive, so ``Session`` runs its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from mesh.errors import Unavailable
from mesh.store.kv import Kv

log = logging.getLogger(__name__)


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
        store: Kv,
        ttl_s: int,
        outage_grace_s: float = 0.0,
        on_state: Callable[[str], None] = lambda _: None,
    ) -> None:
        self._kv = store
        self.ttl_s = ttl_s
        self._grace_s = outage_grace_s
        self._on_state = on_state
        self.lease_id = 0
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        try:
            self.lease_id = await self._kv.grant(self.ttl_s)
        except Unavailable as exc:
            raise Unavailable(f"cannot grant an etcd lease: {exc}") from exc
        self._task = asyncio.create_task(self._keep_alive(), name="lease-keepalive")

    async def _keep_alive(self) -> None:
        """Refresh until the lease is lost; however this ends (a bug included), unless
        ``close`` ended it, the lease counts as lost: nothing is kept under a lease
        that no one refreshes."""
        try:
            await self._refresh()
        except Exception:
            log.exception("lease %x keep-alive failed", self.lease_id)
        finally:
            if not self._closing:
                self._on_state("lost")
                self.lost.set()

    async def _refresh(self) -> None:
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
                    left_s = await self._kv.keepalive(self.lease_id)
            except (TimeoutError, Unavailable) as exc:
                log.warning("lease %x refresh failed: %s", self.lease_id, exc)
                if not troubled:
                    troubled = True
                    self._on_state("trouble")
                if loop.time() >= good_until + self._grace_s:
                    log.error("etcd unreachable %.0fs past the lease TTL", self._grace_s)
                    break
                continue
            if left_s <= 0:
                log.error("lease %x expired", self.lease_id)
                break
            if troubled:
                troubled = False
                self._on_state("ok")
            good_until = sent + left_s

    async def close(self, revoke: bool = True) -> None:
        """Stop the keep-alive and, by default, revoke the lease so its keys vanish now."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if revoke and self.lease_id and not self.lost.is_set():
            try:
                await self._kv.revoke(self.lease_id)
            except Unavailable as exc:
                log.warning("could not revoke lease %x: %s", self.lease_id, exc)
        self.lost.set()
