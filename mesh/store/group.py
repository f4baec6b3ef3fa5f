"""Group commit: the etcd transactions an agent makes at about the same time, sent as one.

Each caller's transaction rides as a nested transaction inside one outer transaction
(etcd 3.3 and later): it keeps its own comparisons and gets its own outcome, exactly as
if sent alone, while etcd applies the whole batch as one raft proposal at one revision.

Nothing waits on a timer. A transaction goes out at once when none is in flight; those
that arrive meanwhile queue, and go out together when the batch in flight returns. A
quiet DC sees no added latency; a busy one sees a proposal per round trip instead of
one per write. etcd refuses a transaction that writes one key twice, so two writes to
the same key never share a batch: the later waits for the next. A batch etcd refuses
outright (one of its transactions names a lease that is gone, say) was applied in no
part: each of its transactions is sent again alone, so only the culprit hears of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd
import aetcd.transactions as tx
import grpc
from aetcd import rtypes
from opentelemetry import trace

from mesh import metrics, tracing
from mesh.store.etcd import stub_options

MAX_BATCH = 64  # etcd's default --max-txn-ops is 128 operations per transaction
Outcome = tuple[bool, list[Any], int]  # aetcd's transaction() result, and the revision
# What etcd answers for a request it refused whole, before applying any of it.
REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
}


def _future() -> asyncio.Future[Outcome]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Txn:
    compare: Sequence[Any]
    success: Sequence[Any]
    failure: Sequence[Any]
    done: asyncio.Future[Outcome] = field(default_factory=_future)

    @property
    def writes(self) -> set[bytes]:
        return _writes(self.success, self.failure)


def _writes(*branches: Sequence[Any]) -> set[bytes]:
    """The keys these operations write, nested transactions' included (etcd refuses a
    transaction that writes a key twice at any depth)."""
    keys: set[bytes] = set()
    for op in (op for branch in branches for op in branch):
        if isinstance(op, tx.Put | tx.Delete):
            keys.add(op.key)
        elif isinstance(op, tx.Txn):
            keys |= _writes(op.success or (), op.failure or ())
    return keys


class GroupCommit:
    def __init__(self, client: aetcd.Client, max_batch: int = MAX_BATCH) -> None:
        self._client = client
        self._max_batch = max_batch
        self._queued: list[_Txn] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0  # outer transactions sent, and the transactions they carried:
        self.carried = 0  # their ratio is the batching the load allowed

    async def transaction(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> Outcome:
        """As ``aetcd.Client.transaction``, with the store's revision after it; raises
        what it raises. Inside a traced task's span it is a span of its own: the wait for
        its batch and the batch's round trip."""
        txn = _Txn(compare, success, failure)
        self._queued.append(txn)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all())
        if not trace.get_current_span().is_recording():
            return await txn.done
        with tracing.TRACER.start_as_current_span("etcd txn") as span:
            outcome = await txn.done
            span.set_attribute("etcd.succeeded", bool(outcome[0]))
            return outcome

    async def _send_all(self) -> None:
        while batch := self._next_batch():
            try:
                outcomes = await self._send(batch)
            except Exception as exc:  # every caller in the batch hears what etcd said
                outcomes = [exc] * len(batch)
            for txn, outcome in zip(batch, outcomes, strict=True):
                if txn.done.done():
                    continue
                if isinstance(outcome, BaseException):
                    txn.done.set_exception(outcome)
                else:
                    txn.done.set_result(outcome)

    def _next_batch(self) -> list[_Txn]:
        """The oldest queued transactions that write no key in common, in order."""
        batch: list[_Txn] = []
        written: set[bytes] = set()
        left: list[_Txn] = []
        for txn in self._queued:
            if txn.done.done():  # its caller gave up before it was sent
                continue
            writes = txn.writes
            if len(batch) < self._max_batch and not writes & written:
                batch.append(txn)
                written |= writes
            else:
                left.append(txn)
        self._queued = left
        return batch

    async def _send(self, batch: list[_Txn]) -> list[Outcome | BaseException]:
        self.batches += 1
        self.carried += len(batch)
        with metrics.ETCD_SECONDS.time():
            return await self._send_now(batch)

    async def _send_now(self, batch: list[_Txn]) -> list[Outcome | BaseException]:
        if len(batch) == 1:
            return [await self._alone(batch[0])]
        client: Any = self._client
        await client.connect()
        nested = [tx.Txn(t.compare, t.success, t.failure) for t in batch]
        request = aetcd.rpc.TxnRequest(success=client._ops_to_requests(nested))
        try:
            response = await client.kvstub.Txn(request, **stub_options(client))
        except aetcd.rpc.AioRpcError as exc:
            if exc.code() in REFUSED:
                return [await self._alone(txn, catch=True) for txn in batch]
            aetcd.exceptions._handle_exception(exc)
        header = response.header
        return [_outcome(op.response_txn, header) for op in response.responses]

    async def _alone(self, txn: _Txn, catch: bool = False) -> Outcome | BaseException:
        client: Any = self._client
        request = aetcd.rpc.TxnRequest(
            compare=[c.build_message() for c in txn.compare],
            success=client._ops_to_requests(txn.success),
            failure=client._ops_to_requests(txn.failure),
        )
        try:
            await client.connect()
            try:
                response = await client.kvstub.Txn(request, **stub_options(client))
            except aetcd.rpc.AioRpcError as exc:
                aetcd.exceptions._handle_exception(exc)
        except aetcd.ClientError as exc:
            if not catch:
                raise
            return exc
        return _outcome(response, response.header)


def _outcome(response: Any, header: Any) -> Outcome:
    """A nested transaction's outcome in aetcd's form: ranges as (value, Get) pairs, the
    rest as etcd's responses, each with the batch's header (its revision is theirs)."""
    converted: list[Any] = []
    for op in response.responses:
        kind = op.WhichOneof("response")
        if kind == "response_range":
            converted.append([(kv.value, rtypes.Get(header, kv)) for kv in op.response_range.kvs])
        else:
            getattr(op, kind).header.CopyFrom(header)
            converted.append(op)
    return response.succeeded, converted, int(header.revision)
