"""When a DC summary is written to etcd: when it says something new, or is getting old.
Speakers swap summaries every second; etcd should hear only of changes."""

from __future__ import annotations

import pytest

from mesh.core import summaries
from mesh.errors import InvalidTask
from mesh.v1 import peer_pb2


def summary(
    ts_s: float, tasks: int = 0, live: tuple[str, ...] = ("10.0.0.1:1",)
) -> peer_pb2.DcSummary:
    return peer_pb2.DcSummary(
        dc="east", ts_unix_ms=int(ts_s * 1000), agents=3, slots=6, tasks=tasks,
        capacity=18, live=list(live),
    )  # fmt: skip


def test_an_unchanged_summary_is_not_written_again_until_it_grows_old() -> None:
    stored = summary(100)
    assert summaries.worth_storing(summary(100), None)
    for later in (101, 110, 100 + summaries.REFRESH_S - 1):
        assert not summaries.worth_storing(summary(later), stored)
    assert summaries.worth_storing(summary(100 + summaries.REFRESH_S), stored)
    assert summaries.REFRESH_S < summaries.STALE_S  # refreshed long before it goes stale


def test_any_change_is_written_at_once() -> None:
    stored = summary(100)
    assert summaries.worth_storing(summary(101, tasks=1), stored)
    assert summaries.worth_storing(summary(101, live=("10.0.0.2:1",)), stored)


def test_a_summary_counts_active_agents_and_names_the_least_loaded_that_have_an_address() -> None:
    from mesh.core.router import Router
    from mesh.core.routing import Member

    router = Router()
    router.set_members(
        Member(f"a{i}", 1.0, (81920,) * 2, frozenset({"echo"}), queue_limit=4, draining=i == 5)
        for i in range(6)
    )
    for i in range(6):
        router.set_load(f"a{i}", i % 3, 0)
    router.set_loaded("a2", {"m"})
    addresses = {f"a{i}": f"10.0.0.{i}:1" for i in range(6) if i != 0}
    built = summaries.build("west", router, addresses.get, 1)
    assert (built.agents, built.slots, built.capacity) == (5, 10, 30)
    assert built.tasks == 0 + 1 + 2 + 0 + 1
    assert list(built.models_loaded) == ["m"]
    # least loaded first (a0 has no address, a5 drains): a3 (0), then a1 and a4 (1 each)
    assert list(built.live) == ["10.0.0.3:1", "10.0.0.1:1", "10.0.0.4:1"]


def test_a_summarys_global_holdings_are_bounded_like_every_field_a_peer_sends() -> None:
    fine = summary(100)
    fine.global_held.update({"vision": 4, "research@lab": 0})
    summaries.check(fine, now_ms=100_000)
    for bad in ({"../etc": 1}, {"vision": summaries.MAX_HELD + 1}):
        hostile = summary(100)
        hostile.global_held.update(bad)
        with pytest.raises(InvalidTask):
            summaries.check(hostile, now_ms=100_000)
    flood = summary(100)
    flood.global_held.update({f"g{i}": 1 for i in range(summaries.MAX_GROUPS + 1)})
    with pytest.raises(InvalidTask):
        summaries.check(flood, now_ms=100_000)


def test_a_summary_carries_the_dcs_demand_most_asked_first_and_bounded() -> None:
    from mesh.core.router import Router

    demand = {f"m{i}": 1.0 / (i + 1) for i in range(summaries.MAX_MODELS + 10)}
    built = summaries.build("west", Router(), {}.get, 1, demand={**demand, "idle": 0.0})
    assert len(built.demand) == summaries.MAX_MODELS and "idle" not in built.demand
    assert built.demand["m0"] == 1.0 and round(built.demand["m2"], 6) == 0.33  # 2 digits
    assert f"m{summaries.MAX_MODELS}" not in built.demand  # the least asked are left out
    summaries.check(built, now_ms=1)
    for bad in ({"no spaces": 1.0}, {"m": -1.0}, {"m": float("nan")}, {"m": float("inf")}):
        hostile = summary(100)
        hostile.demand.update(bad)
        with pytest.raises(InvalidTask, match="demand"):
            summaries.check(hostile, now_ms=100_000)


def test_demand_is_written_when_its_shares_drift_not_at_every_wiggle() -> None:
    stored = summary(100)
    stored.demand.update({"hot": 6.0, "cold": 1.0})
    wiggle = summary(101)
    wiggle.demand.update({"hot": 6.1, "cold": 1.0})
    assert not summaries.worth_storing(wiggle, stored)
    shifted = summary(101)
    shifted.demand.update({"hot": 1.0, "cold": 6.0})
    assert summaries.worth_storing(shifted, stored)


def test_a_stored_summary_is_protobuf_and_an_older_agents_json_is_still_read() -> None:
    from google.protobuf import json_format

    summary = peer_pb2.DcSummary(dc="east", agents=3, slots=6, live=["e1:7000"])
    summary.demand["sdxl"] = 0.5
    assert summaries.decode(summaries.encode(summary)) == summary
    assert summaries.decode(json_format.MessageToJson(summary).encode()) == summary
    for garbage in (b"{not json", b"\xff\xff\xff"):
        with pytest.raises(ValueError, match="not a summary"):
            summaries.decode(garbage)
