"""Following a task's record (``RecordReads.follow``) over the simulator's store: what a
Watch stream sees when the store's history is compacted under it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mesh.store import kv
from mesh.store.keys import KeySpace
from mesh.store.reads import RecordReads, encode
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb
from sim.kv import SimKv
from sim.loop import run

KEYS = KeySpace("t", "west")


class CountedWatches(SimKv):
    """A store that refuses a follower's twentieth watch: one that spins on compacted
    history fails the test instead of hanging it."""

    watches = 0

    def watch(self, key: bytes, *, prefix: bool, start_revision: int) -> AsyncIterator[kv.Event]:
        self.watches += 1
        assert self.watches < 20, "the follower keeps watching compacted history"
        return super().watch(key, prefix=prefix, start_revision=start_revision)


def record(state: int) -> bytes:
    return encode(peer_pb2.TaskRecord(status=pb.TaskStatus(task_id="t1", state=state)))


def test_a_follower_whose_record_predates_a_compaction_watches_on_past_it() -> None:
    """Seed 79 of the simulator: a Watch resumed after a record last written before the
    store compacted found that history gone on every try, and spun without end."""

    async def main() -> list[int]:
        store = CountedWatches()
        seen_at = await store.put(KEYS.task("t1"), record(pb.TASK_STATE_RUNNING))
        for n in range(3):  # other keys move the store on; then history goes
            latest = await store.put(KEYS.task(f"other{n}"), b"x")
        store.compact(latest)

        async def finish() -> None:
            await asyncio.sleep(1.0)
            await store.put(KEYS.task("t1"), record(pb.TASK_STATE_SUCCEEDED))

        finishing = asyncio.create_task(finish())
        states = [s.status.state async for s in RecordReads(store, KEYS).follow("t1", seen_at)]
        await finishing
        return states

    # Nothing newer than the follower saw until the task ends: then its end, and no more.
    assert run(main()) == [pb.TASK_STATE_SUCCEEDED]
