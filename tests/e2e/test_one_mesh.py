"""One mesh to its users, on two DCs with an etcd each: every task read, watched, listed
and cancelled through an agent of the other DC; a cancel storm over a deep backlog that
ends every waiting task without waiting its turn; one task per id submitted through both
DCs; and, when an id's home could not be asked, the duplicate found and ended, and
whoever asks the losing DC about it answered from the winner's copy."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import aetcd
import grpc
import pytest
from support import (
    GROUPS,
    AgentProc,
    Cluster,
    apply_topology,
    eventually,
    sleep_spec,
    two_dcs,
    wait_log,
)

from mesh.client import MeshClient
from mesh.core.access import SUBMITTER
from mesh.core.clock import now_ms
from mesh.core.home import home_dc
from mesh.core.task import TERMINAL, state_name
from mesh.local.etcdserver import EtcdMember
from mesh.sdk import AsyncClient
from mesh.store.claims import Claim, ClaimStore
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.reads import decode
from mesh.v1 import tasks_pb2 as pb
from mesh.v1.peer_pb2 import TaskRecord

DCS = ["east", "west"]


async def mesh_of_two(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str, **flags: object
) -> tuple[AgentProc, AgentProc]:
    etcds, start = two_dcs(cluster, more_etcd)
    west, east = start("west", **flags), start("east", **flags)
    seeds = {"west": west.peer_address, "east": east.peer_address}
    await apply_topology(cluster, prefix, etcds, seeds)
    for agent in (west, east):
        wait_log(agent, "topology version 1 applied")
    return west, east


def homed_in(dc: str, count: int, stem: str) -> list[str]:
    """``count`` ids whose home is ``dc``."""
    ids = (f"{stem}-{i}" for i in range(10_000))
    return [i for i in ids if home_dc(i, DCS) == dc][:count]


async def final(client: MeshClient, task_id: str) -> pb.TaskStatus:
    async def ended() -> pb.TaskStatus | None:
        status = await client.get(task_id)
        return status if status.state in TERMINAL else None

    return await eventually(ended, what=f"{task_id} to end")


async def test_every_task_is_read_watched_listed_rerun_and_cancelled_through_the_other_dc(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    west, east = await mesh_of_two(cluster, more_etcd, prefix)
    async with west.client() as w, east.client() as e:
        entry = {"west": w, "east": e}
        other = {"west": e, "east": w}
        ids = [f"t{i:02d}" for i in range(12)]
        for i, task_id in enumerate(ids):
            dc = DCS[i % 2]
            reply = await entry[dc].submit(sleep_spec(task_id, seconds=0, steps=1, model="m"))
            assert reply.status.dc == dc
        for i, task_id in enumerate(ids):
            seen = await other[DCS[i % 2]].get(task_id)
            assert (seen.task_id, seen.dc) == (task_id, DCS[i % 2])
            events = [ev async for ev in other[DCS[i % 2]].watch(task_id)]
            assert state_name(events[-1].status.state) == "SUCCEEDED"
        # Every task once, through either DC, in pages smaller than a DC's share.
        for client in (w, e):
            listed, token = [], ""
            while True:
                page = await client.list(limit=5, page_token=token)
                assert not page.unreachable_dcs
                listed += [s.task_id for s in page.tasks]
                token = page.next_page_token
                if not token:
                    break
            assert listed == sorted(ids)
        # Run again through the other DC: made where the old record (and payload) is.
        again = await other["east"].rerun("t00", "t00-again")
        assert (again.status.spec.rerun_of, again.status.dc) == ("t00", "east")
        assert state_name((await final(w, "t00-again")).state) == "SUCCEEDED"
        long = await w.submit(sleep_spec("long", seconds=60, steps=60, model="m"))
        assert long.status.dc == "west"
        await eventually(
            lambda: _is(e, "long", "RUNNING"), what="the long task to run, seen from east"
        )
        cancelled = await e.cancel("long", "not needed")
        assert cancelled.task_id == "long"
        assert state_name((await final(e, "long")).state) == "CANCELLED"
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await e.get("never-submitted")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def _is(client: MeshClient, task_id: str, state: str) -> bool:
    return state_name((await client.get(task_id)).state) == state


async def test_a_cancel_storm_ends_every_waiting_task_without_waiting_its_turn(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    west, east = await mesh_of_two(cluster, more_etcd, prefix, max_queue_length=1)
    async with west.client() as w, east.client() as e:
        blocker = await e.submit(sleep_spec("blocker", seconds=120, steps=120, model="m"))
        assert blocker.status.dc == "east"
        await eventually(lambda: _is(e, "blocker", "RUNNING"), what="the blocker to run")
        waiting = [f"w{i:02d}" for i in range(40)]
        for task_id in waiting:  # one slot, one queue place: the rest wait in the backlog
            await e.submit(sleep_spec(task_id, seconds=0, steps=1, model="m"))
        backlog = await e.queue()
        assert sum(c.depth for c in backlog.classes) >= len(waiting) - 1
        ended = await asyncio.gather(*(w.cancel(t, "storm") for t in waiting))
        # Every one ended while the only slot is still taken: none waited for its turn.
        assert {state_name(s.state) for s in ended} == {"CANCELLED"}
        assert await _is(e, "blocker", "RUNNING")
        backlog = await e.queue()
        assert sum(c.depth for c in backlog.classes) == 0
        await w.cancel("blocker", "storm")
        assert state_name((await final(w, "blocker")).state) == "CANCELLED"


async def test_an_id_submitted_through_both_dcs_is_one_task(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    west, east = await mesh_of_two(cluster, more_etcd, prefix)
    security = cluster.security
    async with (
        west.client() as w,
        east.client() as e,
        AsyncClient([west.address], security, discover=False) as via_west,
        AsyncClient([east.address], security, discover=False) as via_east,
    ):
        ids = homed_in("west", 4, "twin") + homed_in("east", 4, "twin")
        for task_id in ids:  # both at once, whichever DC is the id's home
            spec = sleep_spec(task_id, seconds=0, steps=1, model="m")
            tasks = await asyncio.gather(via_west.submit_spec(spec), via_east.submit_spec(spec))
            assert len({t.last.dc for t in tasks if t.last}) == 1
        listed = [s.task_id for s in await w.list_all()]
        assert sorted(listed) == sorted(ids)
        changed = sleep_spec(ids[0], seconds=1, steps=1, model="m")
        with pytest.raises(grpc.aio.AioRpcError) as conflict:
            await e.submit(changed)
        assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("retry", [True, False], ids=["one-submission", "another-user"])
async def test_an_id_accepted_twice_while_its_home_was_away_keeps_the_homes_task(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str, retry: bool
) -> None:
    """East, the id's home, is away: west records bob's task unclaimed; east claimed the
    id meanwhile. Once east is back, west's owner learns east was first and cancels its
    copy. When the copies are one submission (a client retrying through the other DC),
    west answers from east's from then on: Get, Watch and List. When another user took
    the id (the outside review's probe: bob's open Watch moved to alice's copy and
    streamed her events, her params included), west's copy stays the answer in west,
    cancelled: no stream ever moves into another user's task."""
    etcds, start = two_dcs(cluster, more_etcd)
    west, east = start("west"), start("east")
    await apply_topology(
        cluster, prefix, etcds, {"west": west.peer_address, "east": east.peer_address}
    )
    wait_log(west, "topology version 1 applied")
    task_id = homed_in("east", 1, "away")[0]
    east.signal(signal.SIGKILL)  # east, the id's home, cannot be asked
    east.wait()
    bob, alice = (cluster.trust.user(name, GROUPS, [SUBMITTER]) for name in ("bob", "alice"))
    mine = sleep_spec(task_id, seconds=15, steps=15, model="m", user=pb.User(id="bob"))
    theirs = sleep_spec(task_id, seconds=0.5, steps=1, model="m", user=pb.User(id="alice"))
    theirs.params["alice-private"] = "not for bob"
    async with west.client(bob) as w:
        accepted = await w.submit(mine)
        assert accepted.status.dc == "west" and not accepted.existing  # recorded, unclaimed
        watched = asyncio.create_task(events(w, task_id))  # bob's watch of west's copy
        # Meanwhile, cut off from west, east accepted the same id and claimed it at home.
        west_keys, east_keys = KeySpace(prefix, "west"), KeySpace(prefix, "east")
        async with client_for([etcds["west"].endpoint], security=cluster.trust.operator()) as etcd:
            digest = decode((await etcd.get(west_keys.task(task_id))).value).spec_digest
        async with client_for([etcds["east"].endpoint], security=cluster.trust.operator()) as etcd:
            claim = Claim("east", digest if retry else "alices-digest", now_ms())
            await ClaimStore(EtcdKv(etcd), east_keys).claim(task_id, claim)
        async with start("east").client(bob if retry else alice) as e:
            await e.submit(mine if retry else theirs)
            # East is back: west's owner claims and learns east was first.
            seen = await asyncio.wait_for(watched, 60)  # a hang guard
            ended = await final(w, task_id)
    assert ended == seen[-1]
    if retry:  # west answers from east's copy: the task bob submitted, run there
        assert (state_name(ended.state), ended.dc) == ("SUCCEEDED", "east")
    else:  # bob's own copy, cancelled; alice's task is hers alone
        assert (state_name(ended.state), ended.dc) == ("CANCELLED", "west")
        assert "duplicate: DC east recorded" in ended.error.message
        assert {s.spec.user.id for s in seen} == {"bob"}
        assert not any("alice-private" in s.spec.params for s in seen)
    async with client_for([etcds["west"].endpoint], security=cluster.trust.operator()) as etcd:
        copy = await eventually(
            lambda: ended_copy(etcd, KeySpace(prefix, "west"), task_id), what="west's copy ended"
        )
    assert state_name(copy.status.state) == "CANCELLED"
    assert copy.superseded_by_dc == ("east" if retry else "")
    assert "duplicate: DC east recorded" in copy.status.error.message


async def ended_copy(etcd: aetcd.Client, keys: KeySpace, task_id: str) -> TaskRecord | None:
    """The record of ``task_id`` in a DC's etcd once it has ended."""
    found = await etcd.get(keys.task(task_id))
    record = decode(found.value) if found else None
    return record if record and record.status.state in TERMINAL else None


async def events(client: MeshClient, task_id: str) -> list[pb.TaskStatus]:
    """Every status a watch of ``task_id`` streams, to its end."""
    return [event.status async for event in client.watch(task_id)]
