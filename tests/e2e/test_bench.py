"""``python -m bench route`` runs and reports what it promises (figures are not asserted:
speed lives in the benchmark's own output, next to its baselines)."""

from __future__ import annotations

import json
import subprocess
import sys

from support import ROOT

POLICIES = {
    "random",
    "round_robin",
    "consistent_hash",
    "least_loaded",
    "power_of_two",
    "ours",
    "ours+planner",
    "ours+planner+conserve",
    "omniscient",
}


def bench(*args: str, timeout_s: float) -> dict:
    """``python -m bench ARGS`` (with ``--json`` among them): what it printed, parsed."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]  # why it failed, not only that it did
    return json.loads(done.stdout)


def test_bench_route_json_has_every_figure() -> None:
    args = ["--sizes", "10,100", "--requests", "300", "--tasks", "1500"]
    result = bench("route", "--json", *args, timeout_s=170)
    assert set(result["p50_us"]) == set(result["p99_us"]) == {"10", "100"}
    assert set(result["policies"]) == POLICIES
    for figures in result["policies"].values():
        assert set(figures) >= {"max_over_avg", "affinity", "mean_jct_s", "p99_jct_s"}
        assert figures["idle_slot_s_while_queued"] >= figures["idle_slot_s_past_bound"] >= 0
    # The simulation is seeded, so this is a fact about the trace, not a timing.
    ours, scattered = result["policies"]["ours"], result["policies"]["random"]
    assert ours["affinity"] > scattered["affinity"]


def test_bench_gossip_json_has_every_figure() -> None:
    result = bench("gossip", "--json", "--sizes", "30", "--agents", "3", timeout_s=170)
    assert set(result["converge_p50_s"]) == set(result["converge_p99_s"]) == {"30", "3 processes"}
    assert set(result["bytes_per_s_per_agent"]) == {"30"}


def test_bench_failover_reports_both_gaps() -> None:
    result = bench("failover", "--json", timeout_s=170)
    assert set(result) == {"owner_failover_s", "orphan_rerun_s", "lease_ttl_s"}
    assert result["owner_failover_s"] > 0 and result["orphan_rerun_s"] > 0


def test_bench_hop_reports_every_hop() -> None:
    result = bench("hop", "--json", "--calls", "200", timeout_s=170)
    for hop in ("plaintext", "tls", "mtls", "agent offer"):
        assert set(result[hop]) == {"p50_us", "p99_us"} and result[hop]["p50_us"] > 0


def test_bench_fuzz_finds_nothing_in_a_short_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "fuzz", "--json", "--examples", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["failures"] == [], result["failures"]
    assert result["statuses"]["datagram sent"] == 50


def test_bench_cancel_reaches_every_task_through_any_agent() -> None:
    result = bench("cancel", "--json", "--tasks", "60", timeout_s=170)
    assert result["accepted"] == 60
    assert result["get_cancel_ok"] == 1.0, result["errors"]
    assert result["ignored_cancels"] == []  # no success after a Cancel saw it unfinished
    assert result["never_ended"] == {}  # every cancelled task ended, within 30 s
    cancelled = result["cancel_waiting"]["count"] + result["cancel_running"]["count"]
    assert cancelled > 0 and result["floor_get"]["count"] == 60


def test_bench_e2e_reports_every_figure_from_one_run() -> None:
    result = bench("e2e", "--json", "--tasks", "100", "--concurrency", "16", timeout_s=170)
    assert result["tasks"] == 100
    assert result["completed_per_s"] > 0 and result["accepted_per_s"] > 0
    assert 0 < result["etcd_writes_per_task"] <= result["etcd_keys_per_task"]
    assert set(result["cpu_ms_per_task"]) == {"agents", "etcd", "client"}
    assert result["db_bytes_after"] >= result["db_bytes_before"] > 0
    assert result["submit_p50_ms"] > 0 and result["health_p50_ms"] > 0
    for prefix in ("", "idle_"):  # Submit to RUNNING, under the load and one at a time
        assert 0 < result[f"{prefix}start_p50_ms"] <= result[f"{prefix}start_p99_ms"]


def test_bench_e2e_submits_over_streams_too() -> None:
    args = ["--tasks", "100", "--via", "stream"]
    result = bench("e2e", "--json", *args, timeout_s=170)
    assert result["via"] == "stream" and result["completed_per_s"] > 0


def test_bench_scale_reports_every_figure_per_size() -> None:
    args = ["--sizes", "100", "--changes", "10", "--churn-s", "2"]
    result = bench("scale", "--json", *args, timeout_s=170)["100"]
    assert result["false_death"] is False and result["registration_rewrites"] >= 0
    assert result["ring_update_ms_p99"] >= result["ring_update_ms_p50"] > 0
    assert result["full_rebuild_ms"] > 0 and result["route_p50_us"] > 0
    assert result["health_ms_max"] >= result["health_ms_p99"] > 0
    assert result["loop_lag_ms_p99"] > 0 and result["rss_mb"] > 0


def test_bench_layers_compares_both_allocators_with_the_optimum() -> None:
    result = bench("layers", "--json", "--cases", "20", timeout_s=170)
    assert result["cases"] == 20 and result["feasible"] > 0
    for name in ("greedy", "dp"):
        assert result[name]["mean_over_optimum"] >= 1.0  # nothing beats the optimum


def test_bench_tenants_reports_shares_waits_and_violations_with_and_without_tenants() -> None:
    result = bench("tenants", "--json", "--seconds", "4", timeout_s=240)
    for phase in ("tenants_off", "tenants_on"):
        figures = result[phase]
        assert set(figures["share"]) == {"heavy", "light", "flood"}
        assert figures["batch_tasks"] > 0
        for name in ("max_share_error", "jain_index", "online_wait_p99_s", "reclaim_p99_s"):
            assert figures[name] >= 0
    assert result["tenants_on"]["quota_violations"] == 0  # caps hold with no scheduler


def test_bench_globalcap_measures_over_admission_with_and_without_the_holdings() -> None:
    result = bench("globalcap", "--json", "--minutes", "2", timeout_s=120)
    for rule in ("parts_only", "parts_and_held", "parts_and_held_no_lag"):
        assert 0 <= result[rule]["time_over_cap_share"] <= 1
        assert result[rule]["over_admission_max_gpus"] >= 0


def test_bench_placement_reports_cold_share_and_completion_with_the_plan_off_and_on() -> None:
    args = ["--seconds", "3", "--agents", "2", "--scenarios", "zipf"]
    result = bench("placement", "--json", *args, timeout_s=240)
    for run in ("plan_off", "plan_on"):
        figures = result[run]
        assert figures["tasks"] > 0 and 0 < figures["ideal_share"] <= figures["cold_share"] <= 1
        assert figures["p99_s"] >= figures["mean_s"] > 0


def test_bench_placement_reports_idle_slots_and_makespan_with_conservation_off_and_on() -> None:
    args = ["--scenarios", "queued", "--queued-scale", "0.1"]
    result = bench("placement", "--json", *args, timeout_s=240)
    assert set(result) == {"queued_long", "queued_short"}
    for shape in result.values():
        for figures in (shape["conserving_off"], shape["conserving_on"]):
            assert figures["makespan_s"] >= figures["omniscient_s"] > 0
            assert figures["idle_slot_s_while_queued"] >= figures["beyond_bound_slot_s"] >= 0
