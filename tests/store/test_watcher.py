"""Watches on a real etcd whose creates are abandoned midway, as a busy agent abandons
them when its callers give up: every watch made after still follows its own key."""

from __future__ import annotations

import asyncio
import contextlib

import aetcd
import pytest

ROUNDS = 20  # aetcd 1.0's own watcher misroutes most of these rounds


async def test_a_create_abandoned_midway_leaves_the_next_watch_its_own_key(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    abandoned_key, key = f"/{prefix}/abandoned".encode(), f"/{prefix}/followed".encode()
    watches = []
    for _ in range(ROUNDS):
        abandoned = asyncio.create_task(etcd_client.watch(abandoned_key))
        for _ in range(3):  # let it send its create, not let etcd answer it
            await asyncio.sleep(0)
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
        watches.append(await etcd_client.watch(key))
    await etcd_client.put(abandoned_key, b"not yours")
    await etcd_client.put(key, b"yours")
    try:
        for watch in watches:
            async with asyncio.timeout(10):
                event = await anext(aiter(watch))
            assert (event.kv.key, event.kv.value) == (key, b"yours")
    finally:
        for watch in watches:
            await watch.cancel()


async def test_creates_in_flight_together_each_get_their_own_watch(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    keys = [f"/{prefix}/k{i}".encode() for i in range(50)]
    watches = await asyncio.gather(*(etcd_client.watch(k) for k in keys))
    try:
        for k in keys:
            await etcd_client.put(k, k)
        for k, watch in zip(keys, watches, strict=True):
            async with asyncio.timeout(10):
                event = await anext(aiter(watch))
            assert event.kv.key == k
    finally:
        for watch in watches:
            await watch.cancel()


async def test_a_refused_create_fails_at_once_and_the_next_one_is_served(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    """etcd names a refused create's answer -1, not the id it was asked for."""
    with pytest.raises(aetcd.ClientError, match="permission denied"):
        await etcd_client.watch(b"/not-this-tests-prefix/key")
    key = f"/{prefix}/after".encode()
    watch = await etcd_client.watch(key)
    try:
        await etcd_client.put(key, b"served")
        async with asyncio.timeout(10):
            event = await anext(aiter(watch))
        assert event.kv.value == b"served"
    finally:
        await watch.cancel()
