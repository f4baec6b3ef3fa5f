"""What the checker reads from the DCs' stores at the end of a run: every task's final
record and every queue-owner term. Over the key-value port, so the chaos suite (real etcd)
and the simulator (``sim``) hand the one checker the same facts the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from chaos.checker import Term
from mesh.core.task import state_name
from mesh.store import kv
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv, prefix_end
from mesh.store.reads import decode

Record = dict[str, object]


async def records(
    stores: Mapping[str, Kv], prefix: str
) -> tuple[dict[str, Record], dict[str, list[str]]]:
    """The final record of every task, from the DC that ran it (hand-overs followed),
    and the ids recorded in more than one DC (the record kept is the one not ended as
    a duplicate)."""
    found: dict[str, Record] = {}
    split: dict[str, list[str]] = {}
    for dc, store in stores.items():
        tasks = KeySpace(prefix, dc).tasks
        for stored in (await store.range(tasks, prefix_end(tasks))).kvs:
            record = decode(stored.value)
            if record.forwarded_to_dc:
                continue
            status = record.status
            mine: Record = {
                "state": state_name(status.state),
                "attempt": status.attempt,
                "dc": dc,
                "agent": status.agent,
                "duplicate": status.error.message.startswith("duplicate:"),
            }
            if status.task_id in found:
                split.setdefault(status.task_id, [str(found[status.task_id]["dc"])])
                split[status.task_id].append(dc)
                if mine["duplicate"]:
                    continue
            found[status.task_id] = mine
    return found, split


async def terms(store: Kv, prefix: str, dc: str) -> list[Term]:
    """Every queue-owner term of ``dc`` from the store's history of the election keys."""
    election = KeySpace(prefix, dc).election + b"/"
    head = (await store.range(election, prefix_end(election))).revision
    events: list[kv.Event] = []
    try:
        async with asyncio.timeout(5):
            async for event in store.watch(election, prefix=True, start_revision=1):
                events.append(event)
                if event.kv.mod_revision >= head:
                    break
    except TimeoutError:
        pass  # nothing after the last election event: all of it was read
    return terms_from(events)


def terms_from(events: Iterable[kv.Event]) -> list[Term]:
    """The terms that ``events`` on the election keys (in order) made and ended."""
    created: dict[bytes, tuple[int, str]] = {}
    deleted: dict[bytes, int] = {}
    for event in events:
        found = event.kv
        if event.kind == kv.EventKind.PUT:
            created.setdefault(found.key, (found.create_revision, found.value.decode()))
        else:
            deleted[found.key] = found.mod_revision
    return [
        Term(token, holder.split()[0], deleted.get(key)) for key, (token, holder) in created.items()
    ]
