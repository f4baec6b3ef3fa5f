"""The tenants policy, pure: caps a task counts against, why it waits, and the rule that a
group admin cannot give out more than the group has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from support import ROOT
from typer.testing import CliRunner

from mesh.cli import app
from mesh.core.tenants import (
    Cap,
    Spend,
    Tenants,
    blocked,
    caps,
    global_cap,
    global_share,
    out_of_budget,
    parse,
    renewal_in_s,
    spends,
    verdict,
)
from mesh.errors import ConfigError

POLICY = {
    "groups": {
        "vision": {"max_gpus": 8, "users": {"ada": {"max_gpus": 2}, "bob": {"max_gpus": 6}}},
        "open": {},
    }
}


def test_a_task_counts_against_its_users_cap_and_its_groups() -> None:
    tenants = parse(POLICY, "t")
    assert caps(tenants, "ada", "vision") == [Cap("user", "ada", 2), Cap("group", "vision", 8)]
    assert caps(tenants, "cy", "vision") == [Cap("group", "vision", 8)]  # no split of its own
    assert caps(tenants, "ada", "open") == [] and caps(tenants, "ada", "elsewhere") == []
    assert caps(None, "ada", "vision") == []  # no policy: nobody capped


def test_a_task_waits_with_the_cap_that_holds_it() -> None:
    found = caps(parse(POLICY, "t"), "ada", "vision")
    assert blocked(found, {}, 2) is None
    assert blocked(found, {("user", "ada"): 1}, 2) == "waiting for quota: user ada at 1/2 GPUs"
    held = {("user", "ada"): 0, ("group", "vision"): 8}
    assert blocked(found, held, 1) == "waiting for quota: group vision at 8/8 GPUs"


def test_users_caps_never_add_up_to_more_than_the_groups() -> None:
    greedy = {
        "groups": {
            "vision": {"max_gpus": 4, "users": {"ada": {"max_gpus": 3}, "bob": {"max_gpus": 2}}}
        }
    }
    with pytest.raises(ConfigError, match="add up to 5 GPUs, more than the group's 4"):
        parse(greedy, "t")
    with pytest.raises(ConfigError, match="no user or group name"):
        parse({"groups": {"../etc": {}}}, "t")


def test_meshctl_quota_refuses_a_split_larger_than_the_group_before_touching_etcd(
    tmp_path: Path,
) -> None:
    greedy = tmp_path / "tenants.yaml"
    greedy.write_text("groups:\n  vision:\n    max_gpus: 2\n    users:\n      ada: {max_gpus: 3}\n")
    result = CliRunner().invoke(app, ["quota", "apply", str(greedy), "--home", str(tmp_path)])
    assert result.exit_code != 0
    assert "add up to 3 GPUs, more than the group's 2" in " ".join(result.output.split())
    schema = CliRunner().invoke(app, ["quota", "schema"])
    assert schema.exit_code == 0 and '"groups"' in schema.output


def test_the_shipped_example_parses_and_its_schema_is_current() -> None:
    shipped = ROOT / "topology"
    parse(yaml.safe_load((shipped / "tenants.yaml").read_text()), "tenants.yaml")
    current = json.loads((shipped / "tenants.schema.json").read_text())
    assert current == Tenants.model_json_schema(), (
        "regenerate: meshctl quota schema > topology/tenants.schema.json"
    )


BUDGETED = {
    "groups": {
        "vision": {
            "budget": {"gpu_seconds": 100, "period_s": 3600},
            "users": {"ada": {"budget": {"gpu_seconds": 40, "period_s": 3600}}},
        }
    }
}


def test_a_spent_budget_holds_a_task_until_its_period_is_renewed() -> None:
    found = spends(parse(BUDGETED, "t"), "ada", "vision")
    assert found == [Spend("user", "ada", 40, 3600), Spend("group", "vision", 100, 3600)]
    now_s = 10 * 3600 + 3000.0  # 600 s before the next period
    assert out_of_budget(found, {("user", "ada"): 39.9}, now_s) is None
    assert out_of_budget(found, {("group", "vision"): 100}, now_s) == (
        "waiting for budget: group vision spent 100/100 GPU-seconds this period (renewed in 600s)"
    )
    assert renewal_in_s(found, now_s) == 600
    # Caps are judged first: a task both capped and out of budget says it waits for quota.
    caps_found = [Cap("user", "ada", 1)]
    full = {("user", "ada"): 1}
    assert verdict(caps_found, full, 1, found, {("user", "ada"): 50}, now_s) == (
        "waiting for quota: user ada at 1/1 GPUs"
    )


def test_users_budgets_never_add_up_to_more_than_the_groups() -> None:
    greedy = json.loads(json.dumps(BUDGETED))
    greedy["groups"]["vision"]["users"]["bob"] = {"budget": {"gpu_seconds": 61, "period_s": 3600}}
    with pytest.raises(ConfigError, match="budgets add up to 101 GPU-seconds"):
        parse(greedy, "t")


slots_by_dc = st.dictionaries(
    st.sampled_from(["east", "north", "south", "west"]), st.integers(0, 500), min_size=1
)


@given(st.integers(0, 1000), slots_by_dc)
def test_a_global_caps_parts_add_up_to_it_over_one_view(cap: int, slots: dict[str, int]) -> None:
    parts = {dc: global_share(cap, dc, slots) for dc in slots}
    assert sum(parts.values()) == cap
    total = sum(slots.values())
    for dc, part in parts.items():  # each within one GPU of its slots' proportion
        exact = cap * slots[dc] / total if total else cap / len(slots)
        assert abs(part - exact) < 1
    assert global_share(cap, "elsewhere", slots) == 0  # a DC not in the view: no part


def test_a_dcs_part_of_a_global_cap_leaves_what_the_others_hold() -> None:
    tenants = parse({"groups": {"vision": {"max_gpus_global": 10}}}, "t")
    slots = {"west": 40, "east": 10}
    assert global_cap(tenants, "vision", "west", slots) == Cap("global", "vision", 8)
    assert global_cap(tenants, "vision", "east", slots) == Cap("global", "vision", 2)
    # east's part shrank to 2, but its runs from before hold 5: west waits for them
    assert global_cap(tenants, "vision", "west", slots, held_elsewhere=5) == Cap(
        "global", "vision", 5
    )
    assert global_cap(tenants, "vision", "west", slots, held_elsewhere=12).limit == 0
    assert global_cap(tenants, "other", "west", slots) is None
