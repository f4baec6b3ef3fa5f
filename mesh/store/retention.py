"""How long what a task leaves behind stays in etcd: finished records, pointers to other
DCs, claims on ids.

Each is put under a lease shared by a time bucket, not one lease per key: every key that
must go at about the same time (within ``bucket_s``) rides the same lease, granted once
with a TTL that lasts to the bucket's end. etcd then deletes them together when it
expires, with nothing of ours running. A key lives between ``keep_s`` and
``keep_s + bucket_s`` after it was put.
"""

from __future__ import annotations

import asyncio

from mesh.core import clock
from mesh.errors import Unavailable
from mesh.store.kv import Kv


class Retention:
    def __init__(
        self, store: Kv, keep_s: float, bucket_s: float, pointer_extra_s: float = 0.0
    ) -> None:
        """``pointer_extra_s``: how much longer a pointer to another DC is kept than a
        finished record (the task it points to may run that much longer)."""
        self._kv = store
        self.keep_s = keep_s
        self.pointer_extra_s = pointer_extra_s
        self._bucket_s = max(1.0, bucket_s)
        self._leases: dict[int, int] = {}  # bucket: lease id
        self._granting = asyncio.Lock()

    async def lease(self, extra_s: float = 0.0) -> int:
        """The lease for a key that must live ``keep_s`` (plus ``extra_s``) from now."""
        expires = clock.now() + self.keep_s + extra_s
        bucket = int(expires // self._bucket_s)
        found = self._leases.get(bucket)
        if found is not None:
            return found
        async with self._granting:
            if bucket not in self._leases:
                ttl = int((bucket + 1) * self._bucket_s - clock.now()) + 1
                try:
                    granted = await self._kv.grant(ttl)
                except Unavailable as exc:
                    raise Unavailable(f"cannot grant a retention lease: {exc}") from exc
                self._leases = {b: i for b, i in self._leases.items() if b >= bucket - 1}
                self._leases[bucket] = granted
        return self._leases[bucket]
