"""Every fault the simulator found, as the seed that found it: CI runs them all, so a bug
that came back is named, not rediscovered."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regression:
    seed: int
    tasks: int
    found: str


REGRESSIONS = (
    Regression(
        2,
        60,
        "a run's end written during an 11.8 s etcd outage gave up after 7.7 s (the retry "
        "budget of lease TTL + outage grace was counted in jittered tries, not in time): "
        "the task stayed RUNNING on a live agent for ever (fixed: RetryPolicy.lasts_s)",
    ),
    Regression(
        1,
        60,
        "the same, with both DCs' etcd down and a paused agent",
    ),
    Regression(
        111,
        100,
        "a Submit whose placement failed while its agent was cut off and its DC's etcd "
        "went down could not delete its record: it stayed PENDING on a live agent for "
        "ever, holding the id, while the client's retry ran the task in the other DC "
        "(fixed: the withdraw is retried until etcd answers)",
    ),
)
