"""What the checker reads from the DCs' stores at the end of a run: every task's final
record and every queue-owner term. Over the key-value port, so the chaos suite (real etcd)
and the simulator (``sim``) hand the one checker the same facts the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from chaos.checker import Term
from mesh.core.task import state_name
from mesh.core.tenants import Tenants
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
    """The terms that ``events`` on the election keys (in order) made and ended. A key
    may make several: an owner that resigned campaigns again under the same lease."""
    terms: dict[int, Term] = {}  # by token: the key's create revision
    current: dict[bytes, int] = {}  # each key's live term
    for event in events:
        found = event.kv
        if event.kind == kv.EventKind.PUT:
            token = found.create_revision
            if token not in terms:
                terms[token] = Term(token, found.value.decode().split()[0])
                current[found.key] = token
        elif (token := current.pop(found.key, 0)) in terms:
            terms[token] = Term(token, terms[token].holder, found.mod_revision)
    return list(terms.values())


def caps(tenants: Tenants) -> dict[tuple[str, str, str], int]:
    """The GPU caps a policy sets, as the checker holds a run to them: (scope, group,
    user) to GPUs per DC."""
    found = {}
    for group, spec in tenants.groups.items():
        if spec.max_gpus is not None:
            found[("group", group, "")] = spec.max_gpus
        for user, limits in spec.users.items():
            if limits.max_gpus is not None:
                found[("user", group, user)] = limits.max_gpus
    return found
