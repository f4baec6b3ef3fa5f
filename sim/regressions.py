"""Every fault the simulator found, as the seed and the fault schedule that found it: CI
runs them all, so a bug that came back is named, not rediscovered. The schedule is kept
with the seed, so new kinds of fault (which change what a seed draws) do not lose it."""

from __future__ import annotations

from dataclasses import dataclass

from sim.faults import Fault


@dataclass(frozen=True)
class Regression:
    seed: int
    tasks: int
    schedule: tuple[Fault, ...]
    found: str


REGRESSIONS = (
    Regression(
        2,
        60,
        (Fault(1.8, "etcd-down", "east", 11.8),),
        "a run's end written during an 11.8 s etcd outage gave up after 7.7 s (the retry "
        "budget of lease TTL + outage grace was counted in jittered tries, not in time): "
        "the task stayed RUNNING on a live agent for ever (fixed: RetryPolicy.lasts_s)",
    ),
    Regression(
        111,
        100,
        (
            Fault(3.4, "agent-cut", "east-2", 12.0),
            Fault(3.5, "slow-net", "east", 6.1),
            Fault(4.5, "etcd-down", "east", 12.0),
        ),
        "a Submit whose placement failed while its agent was cut off and its DC's etcd "
        "went down could not delete its record: it stayed PENDING on a live agent for "
        "ever, holding the id, while the client's retry ran the task in the other DC "
        "(fixed: a record the Submit could not take back at once is placed once etcd "
        "answers, as an unsure one is)",
    ),
    Regression(
        77,
        100,
        (Fault(1.962, "pause", "west-1", 4.753), Fault(3.069, "etcd-unsure", "west", 9.441)),
        "an agent accepted the same run twice (a paused agent's hand-back crossed its "
        "placement) and ran it twice at once, committing it twice (fixed: an offer of a "
        "run already held is answered 'already here')",
    ),
    Regression(
        67,
        100,
        (
            Fault(1.189, "compact", "east", 6.809),
            Fault(2.757, "slow-net", "west", 5.098),
            Fault(4.073, "etcd-down", "west", 6.043),
        ),
        "a Cancel took a queued job out of its agent's queue, then could not end its record "
        "(etcd down): the task stayed QUEUED for ever (fixed: the end is written once etcd "
        "answers, or the job goes back in the queue and its start ends it)",
    ),
    Regression(
        79,
        100,
        (
            Fault(0.953, "etcd-down", "east", 4.708),
            Fault(1.379, "compact", "east", 5.545),
            Fault(4.621, "etcd-unsure", "west", 11.539),
        ),
        "an adoption from another DC whose record write timed out (applied after all) left "
        "the record PENDING on a live agent; and an accept whose write timed out withdrew "
        "its job though the record named it: both for ever (fixed: the adoption is settled "
        "once etcd answers; an unsure accept keeps its job and lets its start decide)",
    ),
    Regression(
        609,
        200,
        (
            Fault(4.764, "slow-net", "west", 12.571),
            Fault(7.493, "pause", "west-2", 1.706),
            Fault(8.957, "etcd-down", "west", 1.203),
        ),
        "four tasks lost: the withdraw of seed 111's fix deleted, once etcd answered, a "
        "record that a retry of the same id had meanwhile answered 'existing' (fixed: a "
        "record the Submit could not take back at once is placed, not deleted later)",
    ),
)
