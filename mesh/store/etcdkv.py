"""The key-value port (``mesh.store.kv``) over a real etcd, through aetcd.

Transactions go through the group commit (``mesh.store.group``): those made at about the
same time ride one etcd transaction. A failed call is ``Unavailable`` when etcd certainly
did not apply it, ``Unsure`` when it may have; a watch resumes itself across broken
streams (``watch_events``) and raises ``Compacted`` when its history is gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import aetcd
import aetcd.rpc
import aetcd.transactions as tx
import grpc

from mesh.errors import Unavailable, Unsure
from mesh.store import kv
from mesh.store.etcd import ETCD_ERRORS, LeaseIs, never_applied, stub_options, watch_events
from mesh.store.group import GroupCommit

COMPARES = {
    kv.Target.CREATE: tx.Create,
    kv.Target.MOD: tx.Mod,
    kv.Target.VERSION: tx.Version,
    kv.Target.VALUE: tx.Value,
    kv.Target.LEASE: LeaseIs,
}


def _compare(compare: kv.Compare) -> Any:
    return compare.apply(COMPARES[compare.target](compare.key))


def _op(op: kv.Op) -> Any:
    if isinstance(op, kv.If):
        return tx.Txn(
            [_compare(c) for c in op.compare],
            [_op(o) for o in op.success],
            [_op(o) for o in op.failure],
        )
    if isinstance(op, kv.Put):
        return tx.Put(op.key, op.value, lease=op.lease or None)
    if isinstance(op, kv.Delete):
        return tx.Delete(op.key)
    return tx.Get(op.key)


def _kv(got: Any) -> kv.KeyValue:
    return kv.KeyValue(
        got.key, got.value, got.create_revision, got.mod_revision, got.version, got.lease
    )


class EtcdKv:
    def __init__(self, client: aetcd.Client) -> None:
        self._client = client
        self.commits = GroupCommit(client)

    @property
    def client(self) -> aetcd.Client:
        """For etcd's administration only (users, roles): never the agent's."""
        return self._client

    async def connect(self) -> None:
        try:
            await self._client.connect()
        except ETCD_ERRORS as exc:
            raise Unavailable(f"cannot reach etcd: {exc}") from exc

    async def close(self) -> None:
        await self._client.close()

    async def get(self, key: bytes) -> kv.KeyValue | None:
        try:
            got = await self._client.get(key)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return None if got is None else _kv(got)

    async def range(
        self, start: bytes, end: bytes, limit: int = 0, keys_only: bool = False
    ) -> kv.Range:
        request = aetcd.rpc.RangeRequest(key=start, range_end=end, limit=limit, keys_only=keys_only)
        try:
            await self._client.connect()
            reply = await self._client.kvstub.Range(request, **stub_options(self._client))
        except (grpc.aio.AioRpcError, *ETCD_ERRORS) as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return kv.Range(tuple(_kv(x) for x in reply.kvs), reply.more, reply.header.revision)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        try:
            put = await self._client.put(key, value, lease=lease or None)
        except ETCD_ERRORS as exc:
            raise _failed(exc) from exc
        return int(put.header.revision)

    async def delete(self, key: bytes) -> bool:
        try:
            return await self._client.delete(key) is not None
        except ETCD_ERRORS as exc:
            raise _failed(exc) from exc

    async def txn(
        self,
        compare: Sequence[kv.Compare],
        success: Sequence[kv.Op],
        failure: Sequence[kv.Op] = (),
    ) -> kv.TxnResult:
        try:
            succeeded, responses, revision = await self.commits.transaction(
                [_compare(c) for c in compare],
                [_op(o) for o in success],
                [_op(o) for o in failure],
            )
        except ETCD_ERRORS as exc:
            raise _failed(exc) from exc
        ops = success if succeeded else failure
        return kv.TxnResult(
            bool(succeeded),
            revision,
            tuple(_result(op, r) for op, r in zip(ops, responses, strict=True)),
        )

    async def grant(self, ttl_s: int) -> int:
        try:
            granted = await self._client.lease(ttl_s)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return int(granted.id)

    async def keepalive(self, lease_id: int) -> int:
        try:
            reply = await self._client.refresh_lease(lease_id)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc
        return int(reply.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._client.revoke_lease(lease_id)
        except ETCD_ERRORS as exc:
            raise Unavailable(f"etcd: {exc}") from exc

    async def watch(
        self, key: bytes, *, prefix: bool, start_revision: int
    ) -> AsyncIterator[kv.Event]:
        try:
            async for event in watch_events(
                self._client, key, prefix=prefix, start_revision=start_revision
            ):
                put = event.kind == aetcd.EventKind.PUT
                yield kv.Event(kv.EventKind.PUT if put else kv.EventKind.DELETE, _kv(event.kv))
        except aetcd.RevisionCompactedError as exc:
            raise kv.Compacted(exc.compacted_revision) from exc


def _result(op: kv.Op, response: Any) -> kv.KeyValue | int | bool | None:
    if isinstance(op, kv.If):
        return bool(response.response_txn.succeeded)
    if isinstance(op, kv.Get):
        return _kv(response[0][1]) if response else None
    if isinstance(op, kv.Delete):
        return int(response.response_delete_range.deleted)
    return None


def _failed(exc: BaseException) -> Unavailable:
    if never_applied(exc):
        return Unavailable(f"etcd: {exc}")
    return Unsure(f"etcd: {exc}; it may have been applied")
