"""When a DC summary is written to etcd: when it says something new, or is getting old.
Speakers swap summaries every second; etcd should hear only of changes."""

from __future__ import annotations

from mesh.core import summaries
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
