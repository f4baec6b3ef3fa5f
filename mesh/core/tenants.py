"""Tenants: groups, their users, how many GPUs each may hold at once in a DC, and how
many GPU-seconds each may spend there per period. Pure.

The policy is a file (``meshctl quota apply``) that every DC keeps in its etcd. A group
has a cap and a budget; its admin splits the cap among the group's users, and the users'
caps (and budgets) never add up to more than the group's (refused when the file is read).
A task over a cap or a spent budget waits, with the reason, and never fails for it;
``verdict`` says whether and why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mesh.core.classes import DEFAULT_ONLINE_SHARE
from mesh.errors import ConfigError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$"  # user and group names, as tokens carry them


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    gpu_seconds: float = Field(gt=0, description="GPU-seconds the tasks may spend per period")
    period_s: int = Field(
        86_400, ge=60, le=31 * 86_400, description="the period, from the Unix epoch on"
    )


class UserLimits(_Strict):
    max_gpus: int | None = Field(None, ge=0, description="GPUs the user's tasks hold at once")
    budget: Budget | None = Field(None, description="the user's GPU time per period")


class Group(_Strict):
    max_gpus: int | None = Field(None, ge=0, description="GPUs the group's tasks hold at once")
    max_gpus_global: int | None = Field(
        None,
        ge=0,
        description="GPUs the group's tasks hold at once across every DC: each DC holds "
        "to its part, split in proportion to the DCs' GPU slots (their summaries)",
    )
    budget: Budget | None = Field(None, description="the group's GPU time per period, per DC")
    share: float = Field(
        1.0, gt=0, description="weight of the group's GPU time under the fair_share policy"
    )
    users: dict[str, UserLimits] = Field(
        default_factory=dict, description="the group admin's split of the group's cap"
    )

    @model_validator(mode="after")
    def _split_fits(self) -> Group:
        if self.max_gpus is not None:
            split = sum(u.max_gpus for u in self.users.values() if u.max_gpus is not None)
            if split > self.max_gpus:
                raise ValueError(
                    f"the users' caps add up to {split} GPUs, more than the group's {self.max_gpus}"
                )
        if self.budget is not None:
            alike = [u.budget for u in self.users.values() if u.budget is not None]
            spent = sum(b.gpu_seconds for b in alike if b.period_s == self.budget.period_s)
            if spent > self.budget.gpu_seconds:
                raise ValueError(
                    f"the users' budgets add up to {spent:g} GPU-seconds, more than the "
                    f"group's {self.budget.gpu_seconds:g}"
                )
        return self


class Priority(_Strict):
    policy: Literal["weighted", "fair_share", "shortest_first"] = Field(
        "weighted",
        description="weighted: queue classes by their weights; fair_share: the group "
        "furthest below its share of GPU time first; shortest_first: the task expected to "
        "take the fewest GPU-seconds first (learned per pipeline and model)",
    )
    aging_s: float | None = Field(
        None,
        gt=0,
        description="a task that waited this long goes before every younger one, whatever "
        "the policy; unset: each agent's queue_aging_s",
    )


class DcShares(_Strict):
    online_share: float = Field(
        ge=0, le=1, description="part of this DC's GPUs guaranteed to online work"
    )


class Tenants(_Strict):
    version: int = Field(1, ge=1, description="format version of this file")
    online_share: float = Field(
        DEFAULT_ONLINE_SHARE,
        ge=0,
        le=1,
        description="part of each DC's GPUs guaranteed to online work (llm, tts, or asked "
        "for); batch is guaranteed the rest; either borrows the other's idle GPUs, and "
        "borrowed batch runs are preempted when online work waits",
    )
    dcs: dict[str, DcShares] = Field(default_factory=dict, description="per-DC overrides")
    priority: Priority = Field(
        default_factory=Priority, description="which waiting task goes next, in every queue"
    )
    groups: dict[str, Group] = Field(default_factory=dict, description="groups, by name")

    @model_validator(mode="after")
    def _names(self) -> Tenants:
        pattern = re.compile(NAME)
        for group, spec in self.groups.items():
            for name in (group, *spec.users):
                if not pattern.fullmatch(name):
                    raise ValueError(f"{name!r} is no user or group name")
        return self


class Cap(NamedTuple):
    scope: str  # "user" or "group"
    name: str
    limit: int


class Spend(NamedTuple):
    """A budget a task's GPU time counts against."""

    scope: str  # "user" or "group"
    name: str
    gpu_seconds: float
    period_s: int

    def period(self, now_s: float) -> int:
        """Which period ``now_s`` falls in (periods run from the Unix epoch on)."""
        return int(now_s // self.period_s)


class Judged(NamedTuple):
    """A task's quota verdict with all it was decided from (the decision log keeps it)."""

    caps: list[Cap]
    held: dict[tuple[str, str], int]
    budgets: list[Spend]
    used: dict[tuple[str, str], float]
    now_s: float
    reason: str | None  # None: it may try to start


def parse(document: object, where: str) -> Tenants:
    try:
        return Tenants.model_validate(document)
    except ValidationError as exc:
        lines = [
            f"{where}: {'.'.join(map(str, e['loc'])) or '(top)'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise ConfigError("\n".join(lines)) from None


def online_share(tenants: Tenants | None, dc: str) -> float:
    """The part of ``dc``'s GPUs guaranteed to online work."""
    if tenants is None:
        return DEFAULT_ONLINE_SHARE
    override = tenants.dcs.get(dc)
    return tenants.online_share if override is None else override.online_share


def split(
    tenants: Tenants, group: str, users: Mapping[str, int], remove: Iterable[str] = ()
) -> Tenants:
    """``tenants`` with ``group``'s users' caps changed as its admin asks; ``ConfigError``
    (saying why) if the group has no cap to split or the caps would exceed it."""
    spec = tenants.groups.get(group)
    if spec is None or spec.max_gpus is None:
        raise ConfigError(f"group {group!r} has no GPU cap to split (the operator sets one)")
    changed = {u: v for u, v in spec.users.items() if u not in set(remove)}
    changed |= {user: UserLimits(max_gpus=n) for user, n in users.items()}
    document = tenants.model_dump(mode="json")
    document["groups"][group]["users"] = {u: v.model_dump() for u, v in changed.items()}
    return parse(document, f"group {group}")


def caps(tenants: Tenants | None, user: str, group: str) -> list[Cap]:
    """The caps a task of ``user`` in ``group`` counts against (none without a policy)."""
    if tenants is None or group not in tenants.groups:
        return []
    spec = tenants.groups[group]
    found = []
    limits = spec.users.get(user)
    if limits is not None and limits.max_gpus is not None:
        found.append(Cap("user", user, limits.max_gpus))
    if spec.max_gpus is not None:
        found.append(Cap("group", group, spec.max_gpus))
    return found


def global_share(cap: int, dc: str, slots: Mapping[str, int]) -> int:
    """``dc``'s part of a global cap of ``cap`` GPUs split among the DCs in proportion to
    their ``slots`` (largest remainder, ties to the DC named first): over one view of the
    slots, the parts add up to the cap exactly. DCs with no slots get nothing; with no
    slots anywhere, the parts are even."""
    dcs = sorted(slots)
    if dc not in slots or not dcs:
        return 0
    weights = {d: max(0, slots[d]) for d in dcs}
    total = sum(weights.values())
    if total == 0:
        weights, total = dict.fromkeys(dcs, 1), len(dcs)
    exact = {d: cap * w / total for d, w in weights.items()}
    parts = {d: math.floor(x) for d, x in exact.items()}
    left = cap - sum(parts.values())
    for d in sorted(dcs, key=lambda d: (parts[d] - exact[d], d))[:left]:
        parts[d] += 1
    return parts[dc]


def global_cap(
    tenants: Tenants | None,
    group: str,
    dc: str,
    slots: Mapping[str, int],
    held_elsewhere: int = 0,
) -> Cap | None:
    """The cap on ``group``'s GPUs in ``dc`` from its global cap, if it has one: ``dc``'s
    part, and never more than the GPUs the other DCs leave (``held_elsewhere``, from their
    summaries). So a part that grew waits for the runs of a part that shrank to end
    (nothing is taken back); what can still over-admit is two DCs deciding on views a
    summary apart (``python -m bench globalcap`` measures it)."""
    spec = tenants.groups.get(group) if tenants is not None else None
    if spec is None or spec.max_gpus_global is None:
        return None
    cap = spec.max_gpus_global
    return Cap("global", group, max(0, min(global_share(cap, dc, slots), cap - held_elsewhere)))


def spends(tenants: Tenants | None, user: str, group: str) -> list[Spend]:
    """The budgets a task of ``user`` in ``group`` spends from (none without a policy)."""
    if tenants is None or group not in tenants.groups:
        return []
    spec = tenants.groups[group]
    limits = spec.users.get(user)
    return [
        Spend(scope, name, budget.gpu_seconds, budget.period_s)
        for scope, name, budget in (
            ("user", user, limits.budget if limits else None),
            ("group", group, spec.budget),
        )
        if budget is not None
    ]


def out_of_budget(
    found: list[Spend], used: Mapping[tuple[str, str], float], now_s: float
) -> str | None:
    """Why a task must wait for a budget spent this period (``used`` GPU-seconds per
    budget, this period's); None if none is spent. A run that starts within the budget
    may end past it: a budget is checked at the start, and overshoots by that run."""
    for spend in found:
        spent = used.get((spend.scope, spend.name), 0.0)
        if spent >= spend.gpu_seconds:
            return (
                f"waiting for budget: {spend.scope} {spend.name} spent {round(spent, 1):g}/"
                f"{round(spend.gpu_seconds, 1):g} GPU-seconds this period (renewed in "
                f"{renewal_in_s([spend], now_s):.0f}s)"
            )
    return None


def renewal_in_s(found: list[Spend], now_s: float) -> float:
    """Seconds until the first of these budgets starts a new period."""
    return min(((b.period(now_s) + 1) * b.period_s - now_s for b in found), default=math.inf)


def verdict(
    found: list[Cap],
    held: Mapping[tuple[str, str], int],
    gpus: int,
    budgets: list[Spend],
    used: Mapping[tuple[str, str], float],
    now_s: float,
) -> str | None:
    """Why a task must wait, its caps first, then its budgets; None if it may start."""
    return blocked(found, held, gpus) or out_of_budget(budgets, used, now_s)


def blocked(found: list[Cap], held: Mapping[tuple[str, str], int], gpus: int) -> str | None:
    """Why a task needing ``gpus`` must wait, given the GPUs ``held`` per cap; None if
    every cap has room."""
    for cap in found:
        now = held.get((cap.scope, cap.name), 0)
        if now + gpus > cap.limit:
            return f"waiting for quota: {cap.scope} {cap.name} at {now}/{cap.limit} GPUs"
    return None
