"""Cross-DC hand-offs with real agents and real etcd: settling decides, once and for
good, which DC answers for a task whose hand-off nobody saw end; the queue owner settles
the hand-offs of agents that died in the middle of one."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from support import (
    AgentProc,
    Cluster,
    apply_topology,
    eventually,
    peer_channel,
    sleep_spec,
    two_dcs,
    wait_log,
)

from mesh.agent.handoff import intent
from mesh.agent.intake import pointer
from mesh.client import MeshClient
from mesh.core.clock import now_ms
from mesh.core.lifecycle import end, new_record
from mesh.core.task import TERMINAL, spec_digest, state_name
from mesh.errors import AlreadyPlaced
from mesh.local.etcdserver import EtcdMember
from mesh.store.etcd import client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2, peer_pb2_grpc
from mesh.v1 import tasks_pb2 as pb

SettleOutcome = peer_pb2.SettleResponse


def spec(task_id: str, seconds: float = 0.1) -> pb.TaskSpec:
    """An admitted spec, as an entry agent sends it on."""
    return sleep_spec(task_id, seconds=seconds, steps=1, model="m", queue="normal", gpu_count=1)


async def settle(cluster: Cluster, agent: AgentProc, task_id: str, origin: str) -> int:
    """Settle, as an agent of ``origin`` asks ``agent`` (of the other DC)."""
    asking = cluster.as_agent(f"{origin}-9", origin)
    async with peer_channel(agent.peer_address, asking, agent.dc) as channel:
        reply = await peer_pb2_grpc.PeerServiceStub(channel).Settle(
            peer_pb2.SettleRequest(task_id=task_id, origin_dc=origin)
        )
    return reply.outcome


async def offer_from(
    cluster: Cluster, dc: str, agent: AgentProc, task_id: str, seconds: float = 0.1
) -> peer_pb2.OfferResponse:
    envelope = peer_pb2.Envelope(
        spec=spec(task_id, seconds), path=[f"{dc}-9"], hops=1, attempt=1,
        deadline_unix_ms=now_ms() + 60_000, origin_dc=dc,
    )  # fmt: skip
    asking = cluster.as_agent(f"{dc}-9", dc)
    async with peer_channel(agent.peer_address, asking, agent.dc) as channel:
        return await peer_pb2_grpc.PeerServiceStub(channel).Offer(envelope)


async def record_intent(
    cluster: Cluster,
    etcd: EtcdMember,
    prefix: str,
    task_id: str,
    holder: str,
    cancel: str = "",
) -> None:
    """What an agent of west leaves behind when it dies right after writing the intent
    to hand ``task_id`` to east (and maybe after offering it); with ``cancel``, what a
    Cancel through west wrote meanwhile (answered from west: the hand-off was not
    confirmed)."""
    async with client_for([etcd.endpoint], security=cluster.trust.operator()) as client:
        store = TaskStore(EtcdKv(client), KeySpace(prefix, "west"))
        task = spec(task_id)
        record = new_record(
            task, spec_digest(task), now_ms() + 60_000, attempt=1, path=(),
            agent_id=holder, dc="west", inline_payload_bytes=65536,
        )  # fmt: skip
        await store.create(record)
        await store.update(task_id, intent("east", holder), attempt=1)
        if cancel:

            def requested(record: peer_pb2.TaskRecord) -> None:
                record.cancel_requested, record.cancel_reason = True, cancel

            await store.update(task_id, requested)


async def west_ends(
    cluster: Cluster,
    start: Callable[[str], AgentProc],
    etcds: dict[str, EtcdMember],
    prefix: str,
    east: AgentProc,
    task_id: str,
) -> pb.TaskStatus:
    """Start west's agent beside ``east`` (its queue owner takes up what a dead agent left)
    and wait for ``task_id`` to end, as west answers for it."""
    west = start("west")
    await apply_topology(
        cluster, prefix, etcds, {"west": west.peer_address, "east": east.peer_address}
    )
    wait_log(west, "topology version 1 applied")
    async with west.client() as client:
        return await final(client, task_id)


async def final(client: MeshClient, task_id: str) -> pb.TaskStatus:
    async def ended() -> pb.TaskStatus | None:
        status = await client.get(task_id)
        return status if status.state in TERMINAL else None

    return await eventually(ended, timeout_s=30, what=f"{task_id} to end")


async def test_settling_an_unknown_task_keeps_it_in_its_origin_for_good(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    _, start = two_dcs(cluster, more_etcd)
    east = start("east")
    assert await settle(cluster, east, "ghost", "west") == SettleOutcome.OUTCOME_NOT_HELD
    # The offer that was in flight arrives now: east must not take what it gave back.
    late = await offer_from(cluster, "west", east, "ghost")
    assert not late.accepted and "belongs to DC west" in late.reason
    assert await settle(cluster, east, "ghost", "west") == SettleOutcome.OUTCOME_NOT_HELD


async def test_a_task_the_other_dc_took_settles_as_held(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    _, start = two_dcs(cluster, more_etcd)
    east = start("east")
    taken = await offer_from(cluster, "west", east, "adopted")
    assert taken.accepted, taken.reason
    outcome = await eventually(
        lambda: settle(cluster, east, "adopted", "west"),
        what="a settled answer",
    )
    assert outcome == SettleOutcome.OUTCOME_HELD


async def test_a_watch_of_a_pointer_the_other_dc_denies_breaks_instead_of_hanging(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    """Seed 7, burst: east's record pointed to west, west answered "no such task", and
    east then waited on its own pointer, which never changes again: the client's watch
    stayed open and silent for good. It now breaks (UNAVAILABLE) for the caller to
    resume, as the SDK does."""
    etcds, start = two_dcs(cluster, more_etcd)
    east, west = start("east"), start("west")
    await apply_topology(
        cluster, prefix, etcds, {"west": west.peer_address, "east": east.peer_address}
    )
    wait_log(east, "topology version 1 applied")
    async with client_for([etcds["east"].endpoint], security=cluster.trust.operator()) as client:
        await TaskStore(EtcdKv(client), KeySpace(prefix, "east")).create(pointer("denied", "west"))
    async with east.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as broke:
            async for _ in client.watch("denied", timeout_s=60):
                pass
    assert broke.value.code() == grpc.StatusCode.UNAVAILABLE, broke.value.details()
    assert "does not answer for the task" in (broke.value.details() or "")


async def test_a_dc_never_adopts_a_task_whose_copy_there_lost_the_id(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    """Seed 7, burst: west recorded a twin unclaimed (east, its home, answered late), and
    cancelled it once it learnt east held the id, pointing to east's copy. East's backlog
    then handed east's copy to west, which answered "already here" from its cancelled
    one: each DC pointed to the other, and the task never ran. West refuses it now."""
    etcds, start = two_dcs(cluster, more_etcd)
    west = start("west")
    async with client_for([etcds["west"].endpoint], security=cluster.trust.operator()) as client:
        task = spec("lost-the-id")
        copy = new_record(
            task, spec_digest(task), now_ms() + 60_000, attempt=1, path=(),
            agent_id="", dc="west", inline_payload_bytes=65536,
        )  # fmt: skip
        copy.superseded_by_dc = "east"
        end(copy.status, pb.TASK_STATE_CANCELLED, "CANCELLED", "duplicate: DC east first")
        await TaskStore(EtcdKv(client), KeySpace(prefix, "west")).create(copy)
    offered = await offer_from(cluster, "east", west, "lost-the-id")
    assert not offered.accepted and "belongs to DC east" in offered.reason, offered.reason


async def test_the_owner_takes_back_a_dead_agents_hand_off_the_other_dc_never_got(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    etcds, start = two_dcs(cluster, more_etcd)
    east = start("east")
    await record_intent(cluster, etcds["west"], prefix, "orphan", holder="west-gone")
    ended = await west_ends(cluster, start, etcds, prefix, east, "orphan")
    assert (state_name(ended.state), ended.dc, ended.attempt) == ("SUCCEEDED", "west", 2)
    # And east, asked to settle, keeps a pointer back: it will never run it.
    assert await settle(cluster, east, "orphan", "west") == SettleOutcome.OUTCOME_NOT_HELD


async def test_the_owner_points_to_the_dc_that_holds_a_dead_agents_hand_off(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    etcds, start = two_dcs(cluster, more_etcd)
    east = start("east")
    assert (await offer_from(cluster, "west", east, "landed")).accepted  # before it died
    await record_intent(cluster, etcds["west"], prefix, "landed", holder="west-gone")
    # Answered from east once the hand-off is confirmed.
    ended = await west_ends(cluster, start, etcds, prefix, east, "landed")
    assert (state_name(ended.state), ended.dc, ended.attempt) == ("SUCCEEDED", "east", 1)


async def test_an_offer_of_an_attempt_running_elsewhere_is_refused(
    cluster: Cluster, etcd: EtcdMember, prefix: str
) -> None:
    """A task placed twice: the placement that lost must not take the record from the one
    that runs it (its start would then pass the one-run-per-attempt check)."""
    agent = cluster.start("w1")
    async with client_for([etcd.endpoint], security=cluster.trust.operator()) as client:
        store = TaskStore(EtcdKv(client), KeySpace(prefix, "west"))
        task = spec("twice")
        record = new_record(
            task, spec_digest(task), now_ms() + 60_000, attempt=1, path=(),
            agent_id="w9", dc="west", inline_payload_bytes=65536,
        )  # fmt: skip
        record.status.state = pb.TASK_STATE_RUNNING
        await store.create(record)
        envelope = peer_pb2.Envelope(
            spec=task, path=["w9"], hops=1, attempt=1, deadline_unix_ms=now_ms() + 60_000
        )
        async with peer_channel(agent.peer_address, cluster.as_agent("w9")) as channel:
            reply = await peer_pb2_grpc.PeerServiceStub(channel).Offer(envelope)
        assert not reply.accepted and "already running on w9" in reply.reason
        stored = await store.get("twice")
    assert (stored.status.agent, stored.status.state) == ("w9", pb.TASK_STATE_RUNNING)


async def test_an_agent_of_the_dc_never_takes_a_task_it_is_handing_on(
    cluster: Cluster, etcd: EtcdMember, prefix: str
) -> None:
    """Seed 7, etcd-leader-kill: an offer in west timed out while etcd elected a leader,
    the placement handed the task to east, and the offer's accept landed afterwards, so
    the task ran in both DCs. An accept now refuses a record that names another DC, and
    a hand-off refuses a task an agent of its DC took first: it is placed there."""
    agent = cluster.start("w1")
    async with client_for([etcd.endpoint], security=cluster.trust.operator()) as client:
        store = TaskStore(EtcdKv(client), KeySpace(prefix, "west"))
        for task_id in ("leaving", "taken"):
            task = spec(task_id)
            await store.create(
                new_record(
                    task, spec_digest(task), now_ms() + 60_000, attempt=1, path=(),
                    agent_id="w9", dc="west", inline_payload_bytes=65536,
                )
            )  # fmt: skip
        await store.update("leaving", intent("east", "w9"), attempt=1)
        replies = {}
        for task_id in ("leaving", "taken"):
            envelope = peer_pb2.Envelope(
                spec=spec(task_id), path=["w9"], hops=1, attempt=1,
                deadline_unix_ms=now_ms() + 60_000,
            )  # fmt: skip
            async with peer_channel(agent.peer_address, cluster.as_agent("w9")) as channel:
                replies[task_id] = await peer_pb2_grpc.PeerServiceStub(channel).Offer(envelope)
        assert not replies["leaving"].accepted
        assert "handed to DC east" in replies["leaving"].reason
        assert replies["taken"].accepted, replies["taken"].reason
        leaving = await store.get("leaving")
        assert (leaving.record.forwarded_to_dc, leaving.status.agent) == ("east", "w9")
        with pytest.raises(AlreadyPlaced) as placed:
            await store.update("taken", intent("east", "w9"), attempt=1)
        assert placed.value.agent == "w1"
        taken = await store.get("taken")
        assert (taken.record.forwarded_to_dc, taken.status.agent) == ("", "w1")


async def test_a_cancel_written_while_a_hand_off_was_unconfirmed_reaches_the_other_dc(
    cluster: Cluster, more_etcd: Callable[[str], EtcdMember], prefix: str
) -> None:
    """A Cancel answered from the origin's record while the hand-off was in doubt said
    PENDING, and the task then ran to SUCCEEDED in the DC that took it. The confirm that
    finds a cancel asked for now carries it there."""
    etcds, start = two_dcs(cluster, more_etcd)
    east = start("east")
    assert (await offer_from(cluster, "west", east, "called-off", seconds=300)).accepted
    await record_intent(
        cluster, etcds["west"], prefix, "called-off", holder="west-gone", cancel="changed my mind"
    )
    ended = await west_ends(cluster, start, etcds, prefix, east, "called-off")
    assert (state_name(ended.state), ended.dc) == ("CANCELLED", "east")
    assert ended.error.message == "changed my mind"
