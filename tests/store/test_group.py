"""Group commit on a real etcd: transactions sent together keep their own outcomes."""

from __future__ import annotations

import asyncio

import aetcd

from mesh.store.group import GroupCommit


async def test_concurrent_transactions_share_proposals_and_keep_their_outcomes(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    tx = etcd_client.transactions
    taken = f"/{prefix}/taken".encode()
    await etcd_client.put(taken, b"first")
    keys = [f"/{prefix}/k{i}".encode() for i in range(40)]
    group = GroupCommit(etcd_client)

    def create(key: bytes, value: bytes) -> object:
        return group.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, value)], failure=[tx.get(key)]
        )

    outcomes = await asyncio.gather(*(create(k, k) for k in keys), create(taken, b"second"))
    assert group.batches < group.carried == len(keys) + 1  # some went out together
    *created, refused = outcomes
    assert all(ok for ok, _, _ in created)
    ok, responses, _ = refused
    assert not ok and responses[0][0][0] == b"first"  # its own failure branch, alone
    for key, (_, responses, revision) in zip(keys, created, strict=True):
        stored = await etcd_client.get(key)
        assert stored.value == key
        assert responses[0].response_put.header.revision == stored.mod_revision == revision


async def test_two_writes_of_one_key_never_share_a_batch(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    """etcd would refuse the whole batch ("duplicate key given in txn request")."""
    tx = etcd_client.transactions
    key = f"/{prefix}/counter".encode()
    group = GroupCommit(etcd_client)
    writes = [group.transaction([], [tx.put(key, str(i).encode())]) for i in range(5)]
    others = [group.transaction([], [tx.put(key + str(i).encode(), b"")]) for i in range(5)]
    outcomes = await asyncio.gather(*writes, *others)
    assert all(ok for ok, _, _ in outcomes)
    assert (await etcd_client.get(key)).value == b"4"  # in the order they were asked
    assert group.batches >= 5


async def test_a_refused_transaction_fails_alone_not_its_batch(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    """etcd refuses a whole transaction that names a lease it does not have."""
    tx = etcd_client.transactions
    group = GroupCommit(etcd_client)
    keys = [f"/{prefix}/b{i}".encode() for i in range(6)]
    gone = 0x7FFF_0000_0000_0001
    sent = [
        group.transaction([], [tx.put(k, b"", lease=gone if i == 3 else None)])
        for i, k in enumerate(keys)
    ]
    outcomes = await asyncio.gather(*sent, return_exceptions=True)
    assert isinstance(outcomes[3], aetcd.ClientError)
    assert all(o == outcomes[3] or o[0] for o in outcomes)  # type: ignore[index]
    assert [bool(await etcd_client.get(k)) for k in keys] == [True] * 3 + [False] + [True] * 2
