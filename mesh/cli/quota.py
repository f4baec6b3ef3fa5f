"""Tenants and their quota: ``meshctl quota apply``, ``show`` and ``schema``."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, TypeVar

import aetcd
import typer
import yaml
from rich.table import Table

from mesh.cli.common import (
    DEFAULT_TOPOLOGY,
    EndpointOpt,
    HomeOpt,
    Output,
    OutputOpt,
    TopologyOpt,
    as_dict,
    call,
    console,
    emit,
    etcd_security,
    fail,
    resolve_endpoint,
)
from mesh.core.tenants import Cap, Spend, Tenants, caps, parse, spends
from mesh.errors import ConfigError, Unavailable
from mesh.local import localmesh
from mesh.store.etcd import ETCD_ERRORS, client_for
from mesh.store.etcdkv import EtcdKv
from mesh.store.keys import KeySpace
from mesh.store.quota import (
    POLICY,
    PREEMPTED,
    apply_policy,
    borrowed,
    parse_slot,
    parse_usage,
    seconds,
)
from mesh.topology import load as load_topology

L = TypeVar("L", Cap, Spend)
SHOW_COLUMNS = (
    "dc", "who", "held", "borrowed", "limit", "spent_s", "budget_s", "preempted"
)  # fmt: skip
app = typer.Typer(no_args_is_help=True, help="Tenants' caps: apply a policy, see usage.")


@app.command("schema")
def quota_schema() -> None:
    """The tenants file's JSON Schema."""
    print(json.dumps(Tenants.model_json_schema(), indent=2))


@app.command("apply")
def quota_apply(
    file: Annotated[Path, typer.Argument(help="tenants file (YAML or JSON)")],
    topology: TopologyOpt = DEFAULT_TOPOLOGY,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Check FILE and store it in every DC's etcd; agents apply it at once."""
    text = file.read_text()
    try:
        parse(yaml.safe_load(text), str(file))
        mesh = load_topology(topology)
    except (ConfigError, yaml.YAMLError) as exc:
        raise fail(str(exc)) from None
    security = etcd_security(home)

    async def apply_all() -> dict[str, str]:
        report = {}
        for dc, spec in mesh.dcs.items():
            try:
                async with client_for(spec.etcd, security=security) as client:
                    await apply_policy(EtcdKv(client), KeySpace(mesh.prefix, dc), text)
                report[dc] = "applied"
            except (Unavailable, *ETCD_ERRORS) as exc:  # the connect is aetcd's own
                report[dc] = f"failed: {exc}"
        return report

    report = asyncio.run(apply_all())
    for dc, outcome in report.items():
        console.print(f"{dc}: {outcome}")
    if any(o != "applied" for o in report.values()):
        raise typer.Exit(1)


@app.command("split")
def quota_split(
    group: Annotated[str, typer.Argument(help="the group whose cap to split")],
    user: Annotated[
        list[str], typer.Option("--user", help="USER=GPUS, the user's cap (repeatable)")
    ] = [],  # noqa: B006
    remove: Annotated[list[str], typer.Option(help="a user whose own cap goes")] = [],  # noqa: B006
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """As GROUP's admin, split its GPU cap among its users in the endpoint's DC (refused if
    the users' caps would add up to more than the group's)."""
    users = {}
    for item in user:
        name, _, gpus = item.partition("=")
        if not name or not gpus.isdigit():
            raise fail(f"--user {item!r}: give USER=GPUS, e.g. --user ada=4", 2)
        users[name] = int(gpus)
    split = call(resolve_endpoint(endpoint, home), lambda c: c.split_quota(group, users, remove))

    def table() -> Table:
        shown = Table(
            "user", "max GPUs", title=f"{split.dc}: group {group} at {split.max_gpus} GPUs"
        )
        for name, gpus in sorted(split.users.items()):
            shown.add_row(name, str(gpus))
        return shown

    emit(as_dict(split), output, table)


def _own(limits: list[L], scope: tuple[str, str]) -> L | None:
    """The limit (a cap or a budget) set on ``scope`` itself, among a task's."""
    return next((limit for limit in limits if limit[:2] == scope), None)


@app.command("show")
def quota_show(
    topology: TopologyOpt = DEFAULT_TOPOLOGY,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Per DC: GPUs held against each cap, how many of them are borrowed from the other
    class's share (online or batch), GPU-seconds spent of each budget this period, and
    the group's runs preempted for online work."""
    mesh = load_topology(topology)
    security = etcd_security(home)

    async def read() -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for dc, spec in mesh.dcs.items():
            async with client_for(spec.etcd, security=security) as client:
                rows += await _dc_rows(client, KeySpace(mesh.prefix, dc), time.time())
        return rows

    rows = asyncio.run(read())

    def table() -> Table:
        shown = Table(*SHOW_COLUMNS)
        for row in rows:
            shown.add_row(*(str(row.get(column, "")) for column in SHOW_COLUMNS))
        return shown

    emit(rows, output, table)


async def _dc_rows(client: aetcd.Client, keys: KeySpace, now_s: float) -> list[dict[str, object]]:
    """One DC's rows: each group and user with a cap or a budget there."""
    dc = keys.dc
    policy = await client.get(keys.quota + POLICY.encode())
    held: Counter[tuple[str, str]] = Counter()
    lent: Counter[tuple[str, str]] = Counter()
    used: Counter[tuple[int, int, str, str]] = Counter()
    preempted: dict[str, int] = {}
    for kv in await client.get_prefix(keys.quota):
        name = kv.key[len(keys.quota) :].decode()
        if name.startswith(PREEMPTED) and kv.value.isdigit():
            preempted[name.removeprefix(PREEMPTED)] = int(kv.value)
        elif (slot := parse_slot(name)) is not None:
            held[slot[:2]] += 1
            lent[slot[:2]] += borrowed(kv.value)
        elif (usage := parse_usage(name)) is not None:
            used[usage[0]] += seconds(kv.value)
    if policy is None:
        return [{"dc": dc, "who": "(no policy)"}]
    tenants = parse(yaml.safe_load(policy.value), f"{dc}'s policy")
    rows: list[dict[str, object]] = []
    for group, spec in sorted(tenants.groups.items()):
        for user in [None, *sorted(spec.users)]:
            scope = ("group", group) if user is None else ("user", user)
            cap = _own(caps(tenants, user or "", group), scope)
            spend = _own(spends(tenants, user or "", group), scope)
            if cap is None and spend is None:
                continue
            row: dict[str, object] = {"dc": dc, "who": " ".join(scope)}
            if cap is not None:
                row |= {"held": held[scope], "borrowed": lent[scope], "limit": cap.limit}
            if spend is not None:
                period = (spend.period_s, spend.period(now_s), *scope)
                row |= {"spent_s": round(used[period], 1), "budget_s": spend.gpu_seconds}
            if user is None:
                row["preempted"] = preempted.get(group, 0)
            rows.append(row)
    return rows
