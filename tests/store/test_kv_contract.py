"""The key-value port's contract, run unchanged against a real etcd and the simulator's
store: revisions, create/mod revisions and versions, compare-and-swap transactions, ranges
with limits, leases that take their keys with them, watches that replay from a revision
in order, and compaction. The simulator is only as good as this suite is strict: what
it does not cover, the store must not rely on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aetcd
import pytest
from support import eventually

from mesh.errors import Unavailable
from mesh.local.etcdserver import EtcdMember
from mesh.local.trust import LocalTrust
from mesh.store import kv
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from sim.kv import SimKv

Compact = Callable[[int], Awaitable[None]]


@pytest.fixture(params=[pytest.param("etcd", marks=pytest.mark.etcd), "sim"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[kv.Kv, bytes, Compact]]:
    """A store, a key prefix of this test's own, and a way to compact its history."""
    if request.param == "sim":
        sim = SimKv()

        async def compact_sim(revision: int) -> None:
            sim.compact(revision)

        yield sim, b"/t/", compact_sim
        return
    etcd: EtcdMember = request.getfixturevalue("etcd")
    trust: LocalTrust = request.getfixturevalue("trust")
    prefix: str = request.getfixturevalue("prefix")
    client: aetcd.Client = client_for([etcd.endpoint], security=trust.operator())
    real = EtcdKv(client)
    await real.connect()

    async def compact_etcd(revision: int) -> None:
        await client.compact(revision)

    try:
        yield real, f"/{prefix}/".encode(), compact_etcd
    finally:
        await real.close()


async def test_a_key_keeps_its_create_revision_and_counts_its_versions(store) -> None:
    s, p, _ = store
    first = await s.put(p + b"a", b"1")
    second = await s.put(p + b"a", b"2")
    got = await s.get(p + b"a")
    assert second > first
    assert got == kv.KeyValue(p + b"a", b"2", first, second, 2)
    assert await s.get(p + b"missing") is None
    assert await s.delete(p + b"a") and not await s.delete(p + b"a")
    again = await s.put(p + b"a", b"3")
    assert (await s.get(p + b"a")) == kv.KeyValue(p + b"a", b"3", again, again, 1)


async def test_a_transaction_compares_then_applies_one_branch_at_one_revision(store) -> None:
    s, p, _ = store
    a, b = p + b"a", p + b"b"
    created = await s.txn([kv.create(a) == 0], [kv.Put(a, b"x"), kv.Put(b, b"y")], [kv.Get(a)])
    assert created.succeeded and created.results == (None, None)
    got_a, got_b = await s.get(a), await s.get(b)
    assert got_a and got_b and got_a.mod_revision == got_b.mod_revision == created.revision
    again = await s.txn([kv.create(a) == 0], [kv.Put(a, b"z")], [kv.Get(a)])
    assert not again.succeeded and again.results == (got_a,)
    assert again.revision == created.revision  # a read changes nothing
    swapped = await s.txn(
        [kv.mod(a) == got_a.mod_revision, kv.version(b) > 0, kv.value(b) == b"y"],
        [kv.Delete(b), kv.Get(b)],
    )
    assert swapped.succeeded and swapped.results == (1, None)
    assert swapped.revision == created.revision + 1
    stale = await s.txn([kv.mod(a) == got_a.mod_revision - 1], [kv.Delete(a)], [])
    assert not stale.succeeded and stale.results == ()
    assert not (await s.txn([kv.value(p + b"none") == b""], [], [])).succeeded
    assert (await s.txn([kv.mod(p + b"none") == 0, kv.version(p + b"none") < 1], [], [])).succeeded


async def test_a_range_is_in_key_order_and_says_when_its_limit_cut_it(store) -> None:
    s, p, _ = store
    for name in (b"c", b"a", b"b", b"d"):
        await s.put(p + b"r/" + name, name * 3)
    await s.put(p + b"s", b"outside")
    whole = await s.range(p + b"r/", kv.prefix_end(p + b"r/"))
    assert [x.key for x in whole.kvs] == [p + b"r/" + n for n in (b"a", b"b", b"c", b"d")]
    assert not whole.more and whole.revision == (await s.get(p + b"s")).mod_revision  # type: ignore[union-attr]
    head = await s.range(p + b"r/", kv.prefix_end(p + b"r/"), limit=2, keys_only=True)
    assert [x.key for x in head.kvs] == [p + b"r/a", p + b"r/b"] and head.more
    assert all(x.value == b"" for x in head.kvs)
    tail = await s.range(p + b"r/b\0", kv.prefix_end(p + b"r/"), limit=2)
    assert [x.value for x in tail.kvs] == [b"ccc", b"ddd"] and not tail.more


async def test_a_lease_takes_its_keys_with_it(store) -> None:
    s, p, _ = store
    lease = await s.grant(30)
    await s.put(p + b"held", b"1", lease=lease)
    await s.txn([], [kv.Put(p + b"also", b"2", lease)])
    assert (await s.get(p + b"held")).lease == lease  # type: ignore[union-attr]
    assert (await s.txn([kv.lease(p + b"held") == lease], [], [])).succeeded
    assert (await s.txn([kv.lease(p + b"none") == 0], [], [])).succeeded
    assert await s.keepalive(lease) > 0
    await s.put(p + b"also", b"moved")  # put again with no lease: it stays
    await s.revoke(lease)
    assert await s.get(p + b"held") is None
    assert (await s.get(p + b"also")).value == b"moved"  # type: ignore[union-attr]
    assert await s.keepalive(lease) == 0
    with pytest.raises(Unavailable):
        await s.put(p + b"x", b"1", lease=lease)


async def test_a_lease_not_kept_alive_expires(store) -> None:
    s, p, _ = store
    lease = await s.grant(1)
    await s.put(p + b"short", b"1", lease=lease)
    await eventually(lambda: _gone(s, p + b"short"), timeout_s=10, what="the key to expire")


async def _gone(s: kv.Kv, key: bytes) -> bool:
    return await s.get(key) is None


async def test_a_watch_replays_every_change_in_order_then_follows(store) -> None:
    s, p, _ = store
    start = await s.put(p + b"w/a", b"1")
    await s.txn([], [kv.Put(p + b"w/b", b"2"), kv.Delete(p + b"w/a")])
    await s.put(p + b"x", b"not watched")
    seen: list[tuple[kv.EventKind, bytes, int]] = []

    async def follow() -> None:
        async for event in s.watch(p + b"w/", prefix=True, start_revision=start):
            seen.append((event.kind, event.kv.key, event.kv.mod_revision))
            if len(seen) == 4:
                return

    following = asyncio.create_task(follow())
    await eventually(lambda: _count(seen, 3), what="the history replayed")
    live = await s.put(p + b"w/c", b"3")
    await asyncio.wait_for(following, timeout=10)
    put, delete = kv.EventKind.PUT, kv.EventKind.DELETE
    assert seen == [
        (put, p + b"w/a", start),
        (put, p + b"w/b", start + 1),
        (delete, p + b"w/a", start + 1),
        (put, p + b"w/c", live),
    ]


async def _count(seen: list[object], n: int) -> bool:
    return len(seen) >= n


async def test_a_key_watch_sees_that_key_only(store) -> None:
    s, p, _ = store
    start = await s.put(p + b"k", b"1")
    await s.put(p + b"k2", b"other")
    await s.put(p + b"k", b"2")
    watch = s.watch(p + b"k", prefix=False, start_revision=start)
    values = [(await anext(watch)).kv.value, (await anext(watch)).kv.value]
    await watch.aclose()  # type: ignore[attr-defined]
    assert values == [b"1", b"2"]


async def test_a_watch_from_a_compacted_revision_is_told_so(store) -> None:
    s, p, compact = store
    old = await s.put(p + b"c", b"1")
    latest = await s.put(p + b"c", b"2")
    await compact(latest)
    with pytest.raises(kv.Compacted):
        async for _ in s.watch(p + b"c", prefix=False, start_revision=old):
            pass
    watch = s.watch(p + b"c", prefix=False, start_revision=latest)  # kept: the latest
    assert (await anext(watch)).kv.value == b"2"
    await watch.aclose()  # type: ignore[attr-defined]
