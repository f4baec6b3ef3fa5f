"""Quota slots against a real etcd, with no agent process: a slot is given back only by
the lease that took it, so a run whose lease expired (its slot went with it, and another
run took the slot since) can never free the new holder's slot, alone or in a batch."""

from __future__ import annotations

import asyncio

import aetcd

from mesh.store import kv
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.quota import QuotaStore


def quota(store: kv.Kv, prefix: str) -> tuple[QuotaStore, KeySpace]:
    keys = KeySpace(prefix, "west")
    return QuotaStore(store, keys, lambda: None, lambda: None), keys


async def test_a_give_back_after_the_slot_was_taken_again_leaves_it(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    etcd = EtcdKv(etcd_client)
    store, keys = quota(etcd, prefix)
    slot = keys.quota_slot("group", "chaos", 0)
    woken, other = await etcd_client.lease(30), await etcd_client.lease(30)
    await etcd_client.put(slot, b"woken's run", lease=woken.id)
    await etcd_client.revoke_lease(woken.id)  # paused past its TTL: the slot went with it
    await etcd_client.put(slot, b"another run", lease=other.id)  # and slot 0 was taken again
    # The woken agent's end write, refused or not, gives back what it thinks it holds.
    await etcd.txn([], store.give_back([slot], woken.id))
    held = await etcd_client.get(slot)
    assert held is not None and held.value == b"another run"
    await etcd.txn([], store.give_back([slot], other.id))  # its own: freed
    assert await etcd_client.get(slot) is None
    await etcd_client.revoke_lease(other.id)


async def test_a_batched_give_back_frees_only_the_slots_of_its_own_lease(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    """Group commit nests each give-back inside the batch's transaction: the lease check
    must hold at that depth too, slot by slot."""
    etcd = EtcdKv(etcd_client)
    store, keys = quota(etcd, prefix)
    commits = etcd.commits
    mine, theirs = await etcd_client.lease(30), await etcd_client.lease(30)
    kept, freed = keys.quota_slot("user", "ada", 0), keys.quota_slot("user", "ada", 1)
    await etcd_client.put(kept, b"theirs", lease=theirs.id)
    await etcd_client.put(freed, b"mine", lease=mine.id)
    other_write = keys.quota_slot("user", "bob", 0)
    await asyncio.gather(
        etcd.txn([], store.give_back([kept, freed], mine.id)),
        etcd.txn([], [kv.Put(other_write, b"x")]),
    )
    assert commits.batches == 1 and commits.carried == 2  # both rode in one batch
    assert await etcd_client.get(kept) is not None
    assert await etcd_client.get(freed) is None
    for lease in (mine, theirs):
        await etcd_client.revoke_lease(lease.id)
