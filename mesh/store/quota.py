"""Quota in the DC's etcd: the tenants policy, one key per GPU a capped task holds, and
the GPU-seconds each agent spent against each budget.

A capped tenant's GPUs are numbered slots, ``quota/slots/<scope>/<name>/<n>`` for ``n``
below its cap. A task takes free slots in the same transaction that records its start
(each slot compared absent, then put under the running agent's lease), and gives them
back in the transaction that records its end. So no cap is ever exceeded, whatever the
agents race: two agents cannot both create one key. A dead agent's slots go with its
lease. Every agent mirrors the prefix (one watch), so it knows which slots look free
and which tasks can start; a wrong guess costs one failed start, and the task waits.

A budget's spending is ``quota/usage/<period_s>/<period>/<scope>/<name>/<agent>``: each
agent writes only its own keys (its running total, in the transaction that records a
run's end), so agents never contend, and a budget's spending is the sum over agents. A
budget is judged at a run's start, so concurrent starts may overshoot it by the runs
they begin; it is never undercounted. An agent drops its own keys of past periods.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping

import yaml

from mesh.core import clock
from mesh.core.tenants import (
    Cap,
    Judged,
    Spend,
    Tenants,
    caps,
    global_cap,
    parse,
    spends,
    split,
    verdict,
)
from mesh.errors import ConfigError, StaleWrite
from mesh.store import kv
from mesh.store.keys import KeySpace
from mesh.store.kv import Kv
from mesh.store.mirror import PrefixMirror

log = logging.getLogger(__name__)
POLICY = "policy"


class QuotaStore:
    def __init__(
        self,
        store: Kv,
        keys: KeySpace,
        on_change: Callable[[], None],
        on_policy: Callable[[], None],
        dc_slots: Callable[[], Mapping[str, int]] = dict,
        held_elsewhere: Callable[[str], int] = lambda _: 0,
    ) -> None:
        """``on_change``: the policy or the slots changed (waiting tasks are judged
        again); ``on_policy``: the policy changed (priorities are set again);
        ``dc_slots``: every DC's GPU slots, which global caps are split by;
        ``held_elsewhere``: the GPUs a group holds in the other DCs (their summaries)."""
        self._keys = keys
        self._dc_slots = dc_slots
        self._held_elsewhere = held_elsewhere
        self._on_change = on_change
        self._on_policy = on_policy
        self.tenants: Tenants | None = None
        self._taken: dict[tuple[str, str], set[int]] = {}
        # GPU-seconds per (period_s, period, scope, name), per agent, as etcd has them
        self._used: dict[tuple[int, int, str, str], dict[str, float]] = {}
        self._mine: dict[tuple[int, int, str, str], float] = {}  # this agent's, written
        self.mirror = PrefixMirror(store, keys.quota, on_delta=self._changed)

    def _changed(self, delta: dict[str, bytes | None]) -> None:
        for name, raw in delta.items():
            if name == POLICY:
                self.tenants = self._read_policy(raw)
                self._on_policy()
                continue
            if (usage := parse_usage(name)) is not None:
                budget, agent = usage
                spent = self._used.setdefault(budget, {})
                if raw is None:
                    spent.pop(agent, None)
                else:
                    spent[agent] = seconds(raw)
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
        """The task's caps in this DC: its user's and group's, and its group's part of a
        global cap (as this agent sees the DCs' slots now)."""
        found = caps(self.tenants, user, group)
        spec = self.tenants.groups.get(group) if self.tenants is not None else None
        if spec is None or spec.max_gpus_global is None:
            return found  # the DCs' slots are gathered only for a group with a global cap
        part = global_cap(
            self.tenants, group, self._keys.dc, self._dc_slots(), self._held_elsewhere(group)
        )
        return found if part is None else [*found, part]

    def global_held(self) -> dict[str, int]:
        """GPUs each group holds in this DC against its global cap (for our summary)."""
        return {
            name: len(taken)
            for (scope, name), taken in self._taken.items()
            if taken and scope == "global"
        }

    def waits(self, user: str, group: str, gpus: int) -> str | None:
        """Why a task of ``user`` in ``group`` needing ``gpus`` must wait, as the mirror
        sees the slots and the spending; None if it may try to start."""
        return self.judge(user, group, gpus, clock.now()).reason

    def judge(self, user: str, group: str, gpus: int, now_s: float) -> Judged:
        """The task's caps and budgets, the GPUs held and GPU-seconds spent against them
        as the mirror sees them, and why it must wait: what the decision log keeps."""
        found = self.caps(user, group)
        held = {(c.scope, c.name): len(self._taken.get((c.scope, c.name), ())) for c in found}
        budgets = spends(self.tenants, user, group)
        used = {(b.scope, b.name): self._spent(b, now_s) for b in budgets}
        reason = verdict(found, held, gpus, budgets, used, now_s)
        return Judged(found, held, budgets, used, now_s, reason)

    def _spent(self, budget: Spend, now_s: float) -> float:
        key = (budget.period_s, budget.period(now_s), budget.scope, budget.name)
        return sum(self._used.get(key, {}).values())

    def spend(self, user: str, group: str, gpu_s: float, agent: str, now_s: float) -> list[kv.Op]:
        """Puts that add ``gpu_s`` to this agent's spending against each budget of the
        task (and drop its keys of past periods); written with the run's end."""
        ops: list[kv.Op] = []
        for budget in spends(self.tenants, user, group):
            period = budget.period(now_s)
            key = (budget.period_s, period, budget.scope, budget.name)
            base = self._mine.get(key, self._used.get(key, {}).get(agent, 0.0))
            self._mine[key] = total = base + max(0.0, gpu_s)
            ops.append(kv.Put(self._keys.quota_usage(*key, agent), repr(total).encode()))
            past = [k for k in self._used if k[1] < period and (k[0], *k[2:]) == (key[0], *key[2:])]
            for old in past:
                if agent in self._used[old]:
                    ops.append(kv.Delete(self._keys.quota_usage(*old, agent)))
                self._mine.pop(old, None)
        return ops

    def claim(
        self, user: str, group: str, gpus: int, lease: int, holder: bytes = b""
    ) -> tuple[list[kv.Compare], list[kv.Op], list[bytes]]:
        """Compares and puts that take ``gpus`` free slots of every cap, and the keys they
        name (to give back at the end). Empty when the task is not capped. Each slot's
        value is its ``holder`` (``holder()``): what ``meshctl quota show`` tells."""
        compares: list[kv.Compare] = []
        puts: list[kv.Op] = []
        names: list[bytes] = []
        for cap in self.caps(user, group):
            taken = self._taken.get((cap.scope, cap.name), set())
            free = [n for n in range(cap.limit) if n not in taken][:gpus]
            for n in free:
                key = self._keys.quota_slot(cap.scope, cap.name, n)
                compares.append(kv.create(key) == 0)
                puts.append(kv.Put(key, holder, lease))
                names.append(key)
        return compares, puts, names

    def give_back(self, names: list[bytes], lease: int) -> list[kv.Op]:
        """Operations that free the slots ``names`` taken under ``lease``, each only
        while it is still held under that lease: a slot that went with an expired lease
        and was taken since by another run is that run's, and stays (a nested
        transaction each, so one re-taken slot does not keep the others)."""
        return [kv.If((kv.lease(key) == lease,), (kv.Delete(key),)) for key in names]


async def split_policy(
    store: Kv, keys: KeySpace, group: str, users: dict[str, int], remove: list[str]
) -> Tenants:
    """A group admin's split, written over this DC's policy only if nobody changed it
    meanwhile (compare-and-swap on its revision): a concurrent ``quota apply`` is never
    overwritten with a stale copy."""
    key = keys.quota + POLICY.encode()
    current = await store.get(key)
    if current is None:
        raise ConfigError("this DC has no tenants policy ('meshctl quota apply' sets one)")
    tenants = split(parse(yaml.safe_load(current.value), "the policy"), group, users, remove)
    text = yaml.safe_dump(tenants.model_dump(mode="json", exclude_none=True), sort_keys=False)
    done = await store.txn([kv.mod(key) == current.mod_revision], [kv.Put(key, text.encode())])
    if not done.succeeded:
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


def parse_usage(name: str) -> tuple[tuple[int, int, str, str], str] | None:
    """The budget's (period_s, period, scope, name), and the agent, of a usage key's name
    under ``quota/`` (None: not one)."""
    parts = name.split("/")
    if len(parts) != 6 or parts[0] != "usage" or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    _, period_s, period, scope, who, agent = parts
    return (int(period_s), int(period), scope, who), agent


def seconds(raw: bytes) -> float:
    """A usage value; one that does not parse counts as nothing spent."""
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def parse_slot(name: str) -> tuple[str, str, int] | None:
    """Scope, name and index of a slot key's name under ``quota/`` (None: not a slot)."""
    scope, _, rest = name.removeprefix("slots/").partition("/")
    who, _, index = rest.rpartition("/")
    if not name.startswith("slots/") or not index.isdigit():
        return None
    return scope, who, int(index)


PREEMPTED = "preempted/"


async def count_preemption(store: Kv, keys: KeySpace, group: str) -> None:
    """One more run of ``group`` preempted in this DC, for ``meshctl quota show``: a
    compare-and-swap, tried again when another agent counted at the same moment."""
    key = keys.quota + (PREEMPTED + group).encode()
    for _ in range(5):
        got = await store.get(key)
        count = int(got.value) if got is not None and got.value.isdigit() else 0
        held = kv.create(key) == 0 if got is None else kv.mod(key) == got.mod_revision
        done = await store.txn([held], [kv.Put(key, str(count + 1).encode())])
        if done.succeeded:
            return
    log.warning("could not count a preemption of group %s: too many at once", group)


async def apply_policy(store: Kv, keys: KeySpace, text: str) -> None:
    """Store the tenants policy ``text`` (checked first) in one DC's etcd."""
    parse(yaml.safe_load(text), "tenants")
    await store.put(keys.quota + POLICY.encode(), text.encode())
