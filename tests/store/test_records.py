"""Task records on a real etcd, written by two stores as two agents would: an update that
starts from the record its agent wrote last still lands on the record as it is."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aetcd
import pytest
from google.protobuf import json_format
from support import config

from mesh.agent.history import History
from mesh.agent.reporting import RecordReporter
from mesh.core.clock import now_ms
from mesh.core.jobs import Job, Outcome, Output
from mesh.core.lifecycle import new_record
from mesh.core.task import spec_digest
from mesh.errors import StaleWrite
from mesh.store import reads
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.reads import decode, encode
from mesh.store.records import TaskStore
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb


def record(task_id: str, attempt: int = 1) -> peer_pb2.TaskRecord:
    spec = pb.TaskSpec(task_id=task_id, user=pb.User(id="ada"), pipeline="echo", model="m")
    return new_record(
        spec, spec_digest(spec), now_ms() + 60_000, attempt=attempt, path=(),
        agent_id="a", dc="west", inline_payload_bytes=65536,
    )  # fmt: skip


def note(text: str):  # type: ignore[no-untyped-def]
    def mutate(r: peer_pb2.TaskRecord) -> None:
        r.status.progress.message = text

    return mutate


async def test_an_update_from_a_stale_memory_lands_on_the_record_as_it_is(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    mine, theirs = (TaskStore(EtcdKv(etcd_client), KeySpace(prefix, "west")) for _ in range(2))
    await mine.create(record("t1"))
    await mine.update("t1", note("mine, first"))
    await theirs.update("t1", lambda r: r.status.path.append("theirs"))  # behind my back
    stored = await mine.update("t1", note("mine, second"))
    assert list(stored.status.path) == ["theirs"]  # their change kept, not overwritten
    assert decode((await etcd_client.get(KeySpace(prefix, "west").task("t1"))).value) == (
        stored.record
    )


async def test_a_new_attempt_is_not_refused_on_the_memory_of_the_old_one(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    mine, owner = (TaskStore(EtcdKv(etcd_client), KeySpace(prefix, "west")) for _ in range(2))
    await mine.create(record("t2"))
    await mine.update("t2", note("attempt 1 runs"), attempt=1)

    def requeue(r: peer_pb2.TaskRecord) -> None:
        r.status.attempt = 2

    await owner.update("t2", requeue)  # the owner re-queued it: attempt 2, here again
    stored = await mine.update("t2", note("attempt 2 runs"), attempt=2)
    assert stored.status.progress.message == "attempt 2 runs"
    with pytest.raises(StaleWrite):
        await mine.update("t2", note("a zombie of attempt 1"), attempt=1)


def test_records_are_binary_and_old_json_ones_still_read() -> None:
    original = record("t3")
    assert decode(encode(original)) == original
    old = json_format.MessageToJson(original, preserving_proto_field_name=True).encode()
    assert decode(old) == original


async def test_an_attempt_running_on_one_agent_is_never_started_on_another(
    etcd_client: aetcd.Client, prefix: str
) -> None:
    """A task placed twice (two settles of one unsure Submit, say) runs once: the second
    agent's start write finds the attempt running elsewhere and does not run it."""
    store = TaskStore(EtcdKv(etcd_client), KeySpace(prefix, "west"))
    stored, _ = await store.create(record("twice"))
    spec = stored.status.spec

    def reporter(agent_id: str) -> RecordReporter:
        return RecordReporter(
            config(agent_id=agent_id), store, lambda: 0, History(None, agent_id, "west")
        )

    job = Job(spec, attempt=1, deadline_ms=now_ms() + 60_000)
    assert await reporter("first").started(job, (), borrowed=False)
    assert not await reporter("second").started(job, (), borrowed=False)
    assert (await store.get("twice")).status.agent == "first"


async def test_a_follower_whose_watch_lost_the_end_still_ends(
    etcd_client: aetcd.Client, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch that hears nothing (an event lost on the way) does not hold the follower:
    after a silence it reads the record, and ends with it."""

    class Deaf(EtcdKv):
        async def watch(self, *_: object, **__: object):  # type: ignore[no-untyped-def,override]
            await asyncio.Event().wait()
            yield  # pragma: no cover

    monkeypatch.setattr(reads, "QUIET_S", 0.1)
    store = TaskStore(Deaf(etcd_client), KeySpace(prefix, "west"))
    stored, _ = await store.create(record("quiet"))
    await store.finish("quiet", pb.TASK_STATE_SUCCEEDED, "", "")
    seen = [s.status.state async for s in store.follow("quiet", after=stored.revision)]
    assert seen == [pb.TASK_STATE_SUCCEEDED]


async def test_an_end_that_landed_though_its_call_timed_out_counts_as_committed(
    etcd_client: aetcd.Client, prefix: str, tmp_path: Path
) -> None:
    """Seed 7, etcd-quorum-loss: a run's end write timed out while etcd had no quorum and
    was applied once it had; the retry found the task "already finished" (by that very
    write) and the run was logged as never committed. It is read back and counted."""
    store = TaskStore(EtcdKv(etcd_client), KeySpace(prefix, "west"))
    stored, _ = await store.create(record("landed"))
    history = tmp_path / "history.jsonl"
    written = History(history, "w1", "west")
    reporter = RecordReporter(config(agent_id="w1"), store, lambda: 0, written)
    job = Job(stored.status.spec, attempt=1, deadline_ms=now_ms() + 60_000)
    try:
        assert await reporter.started(job, (), borrowed=False)
        await store.finish("landed", pb.TASK_STATE_SUCCEEDED, "", "", attempt=1)  # first try
        await reporter.finished(job, Outcome(pb.TASK_STATE_SUCCEEDED, output=Output(b"x")))
    finally:
        written.close()
    events = [json.loads(line) for line in history.read_text().splitlines()]
    assert [e["phase"] for e in events if e["op"] == "commit"] == ["ok"]
