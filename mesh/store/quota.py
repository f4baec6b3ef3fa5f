"""Quota in the DC's etcd: the tenants policy, and one key per GPU a capped task holds.

A capped tenant's GPUs are numbered slots, ``quota/slots/<scope>/<name>/<n>`` for ``n``
below its cap. A task takes free slots in the same transaction that records its start
(each slot compared absent, then put under the running agent's lease), and gives them
back in the transaction that records its end. So no cap is ever exceeded, whatever the
agents race: two agents cannot both create one key. A dead agent's slots go with its
lease. Every agent mirrors the prefix (one watch), so it knows which slots look free
and which tasks can start; a wrong guess costs one failed start, and the task waits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import aetcd
import yaml

from mesh.core.tenants import Cap, Tenants, blocked, caps, parse, split
from mesh.errors import ConfigError, StaleWrite
from mesh.store.keys import KeySpace
from mesh.store.mirror import PrefixMirror

log = logging.getLogger(__name__)
POLICY = "policy"


class QuotaStore:
    def __init__(
        self,
        client: aetcd.Client,
        keys: KeySpace,
        on_change: Callable[[], None],
        on_policy: Callable[[], None],
    ) -> None:
        """``on_change``: the policy or the slots changed (waiting tasks are judged
        again); ``on_policy``: the policy changed (priorities are set again)."""
        self._keys = keys
        self._tx = client.transactions
        self._on_change = on_change
        self._on_policy = on_policy
        self.tenants: Tenants | None = None
        self._taken: dict[tuple[str, str], set[int]] = {}
        self.mirror = PrefixMirror(client, keys.quota, on_delta=self._changed)

    def _changed(self, delta: dict[str, bytes | None]) -> None:
        for name, raw in delta.items():
            if name == POLICY:
                self.tenants = self._read_policy(raw)
                self._on_policy()
                continue
            slot = parse_slot(name)
            if slot is None:
                continue
            scope, who, index = slot
            taken = self._taken.setdefault((scope, who), set())
            if raw is None:
                taken.discard(index)
            else:
                taken.add(index)
        # Any change: a task that lost a slot it thought free may find another now.
        self._on_change()

    @staticmethod
    def _read_policy(raw: bytes | None) -> Tenants | None:
        if raw is None:
            return None
        try:
            return parse(yaml.safe_load(raw), "the tenants policy in etcd")
        except (ConfigError, yaml.YAMLError) as exc:
            log.error("ignoring a tenants policy that does not parse: %s", exc)
            return None

    def caps(self, user: str, group: str) -> list[Cap]:
        return caps(self.tenants, user, group)

    def waits(self, user: str, group: str, gpus: int) -> str | None:
        """Why a task of ``user`` in ``group`` needing ``gpus`` must wait, as the mirror
        sees the slots; None if it may try to start."""
        return self.judge(user, group, gpus)[2]

    def judge(
        self, user: str, group: str, gpus: int
    ) -> tuple[list[Cap], dict[tuple[str, str], int], str | None]:
        """The task's caps, the GPUs held against them as the mirror sees the slots, and
        why it must wait (None: it may try to start): what the decision log keeps."""
        found = self.caps(user, group)
        held = {(c.scope, c.name): len(self._taken.get((c.scope, c.name), ())) for c in found}
        return found, held, blocked(found, held, gpus)

    def claim(
        self, user: str, group: str, gpus: int, lease: int, holder: bytes = b""
    ) -> tuple[list, list, list[bytes]]:
        """Compares and puts that take ``gpus`` free slots of every cap, and the keys they
        name (to give back at the end). Empty when the task is not capped. Each slot's
        value is its ``holder`` (``holder()``): what ``meshctl quota show`` tells."""
        compares, puts, names = [], [], []
        for cap in self.caps(user, group):
            taken = self._taken.get((cap.scope, cap.name), set())
            free = [n for n in range(cap.limit) if n not in taken][:gpus]
            for n in free:
                key = self._keys.quota_slot(cap.scope, cap.name, n)
                compares.append(self._tx.create(key) == 0)
                puts.append(self._tx.put(key, holder, lease=lease))
                names.append(key)
        return compares, puts, names

    def give_back(self, names: list[bytes]) -> list:
        return [self._tx.delete(key) for key in names]


async def split_policy(
    client: aetcd.Client, keys: KeySpace, group: str, users: dict[str, int], remove: list[str]
) -> Tenants:
    """A group admin's split, written over this DC's policy only if nobody changed it
    meanwhile (compare-and-swap on its revision): a concurrent ``quota apply`` is never
    overwritten with a stale copy."""
    key = keys.quota + POLICY.encode()
    current = await client.get(key)
    if current is None:
        raise ConfigError("this DC has no tenants policy ('meshctl quota apply' sets one)")
    tenants = split(parse(yaml.safe_load(current.value), "the policy"), group, users, remove)
    text = yaml.safe_dump(tenants.model_dump(mode="json", exclude_none=True), sort_keys=False)
    tx = client.transactions
    ok, _ = await client.transaction(
        compare=[tx.mod(key) == current.mod_revision],
        success=[tx.put(key, text.encode())],
        failure=[],
    )
    if not ok:
        raise StaleWrite("the tenants policy changed meanwhile; read it again and retry")
    return tenants


def holder(task_id: str, agent_id: str, borrowed: bool) -> bytes:
    """A slot's value: the run that holds it, and whether that run borrowed its GPUs
    from the other class's share (online or batch)."""
    return json.dumps({"task": task_id, "agent": agent_id, "borrowed": borrowed}).encode()


def borrowed(value: bytes) -> bool:
    """Whether a slot's holder borrowed its GPUs; a value that does not parse did not."""
    try:
        return json.loads(value).get("borrowed") is True
    except (ValueError, AttributeError):
        return False


def parse_slot(name: str) -> tuple[str, str, int] | None:
    """Scope, name and index of a slot key's name under ``quota/`` (None: not a slot)."""
    scope, _, rest = name.removeprefix("slots/").partition("/")
    who, _, index = rest.rpartition("/")
    if not name.startswith("slots/") or not index.isdigit():
        return None
    return scope, who, int(index)


PREEMPTED = "preempted/"


async def count_preemption(client: aetcd.Client, keys: KeySpace, group: str) -> None:
    """One more run of ``group`` preempted in this DC, for ``meshctl quota show``: a
    compare-and-swap, tried again when another agent counted at the same moment."""
    key = keys.quota + (PREEMPTED + group).encode()
    tx = client.transactions
    for _ in range(5):
        got = await client.get(key)
        count = int(got.value) if got is not None and got.value.isdigit() else 0
        held = tx.create(key) == 0 if got is None else tx.mod(key) == got.mod_revision
        ok, _ = await client.transaction(
            compare=[held], success=[tx.put(key, str(count + 1).encode())], failure=[]
        )
        if ok:
            return
    log.warning("could not count a preemption of group %s: too many at once", group)


async def apply_policy(client: aetcd.Client, keys: KeySpace, text: str) -> None:
    """Store the tenants policy ``text`` (checked first) in one DC's etcd."""
    parse(yaml.safe_load(text), "tenants")
    await client.put(keys.quota + POLICY.encode(), text.encode())
