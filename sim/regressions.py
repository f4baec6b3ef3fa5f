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
        "answers, or the job goes back in the queue and its start ends it). With a backlog "
        "in play it found four more: an adoption neither placed nor taken back (PENDING for "
        "ever, settled as 'in progress' for ever); a Cancel answered PENDING while a "
        "hand-off was unconfirmed, and the other DC ran the task; the owner handing on a "
        "task whose cancel was asked for; a Submit's settle placing a record whose hand-off "
        "was in doubt (fixed: Intake, Cancels, CancelAsked, Submission)",
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
        "once etcd answers; an unsure accept keeps its job and lets its start decide). With "
        "a backlog in play: the owner's claim of an entry timed out though etcd applied it, "
        "leaving the task PENDING under the owner, placed by nobody (fixed: the owner reads "
        "an unsure claim back and places what it took)",
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
    Regression(
        207,
        100,
        (Fault(3.12, "agent-cut", "west-1", 9.969), Fault(3.162, "owner-crash", "east", 2.596)),
        "a task lost: the queue owner died handing a backlog task to the other DC and came "
        "back under its id before anyone saw it die, so nobody settled the hand-off (fixed: "
        "an agent settles the hand-offs its earlier run left in doubt). Also seen: the owner "
        "took, offered and put back one task as fast as etcd wrote, while an agent's queue "
        "was full below the router's bound (fixed: an agent that refused is no room until "
        "news of it)",
    ),
    Regression(
        94,
        200,
        (Fault(0.574, "pause", "west-2", 4.331), Fault(4.428, "owner-pause", "east", 9.292)),
        "a task PENDING for ever in a DC that never ran it: a paused seed took an offer "
        "after its caller had timed out and a second seed had refused, and the origin ran "
        "the task itself (fixed: a refusal after a seed in doubt is settled, not believed)",
    ),
    Regression(
        6,
        200,
        (
            Fault(2.546, "pause", "east-2", 9.829),
            Fault(3.107, "dc-cut", "east", 12.876),
            Fault(5.146, "pause", "east-1", 11.289),
        ),
        "a settle that outlived its owner's term re-queued tasks with the fence of an owner "
        "no longer in the election, which held (fixed: a settle keeps the fence of the term "
        "that found it; out of office, the fence never holds)",
    ),
    Regression(
        181,
        200,
        (Fault(5.824, "owner-duty", "east", 10.408), Fault(6.536, "lossy-net", "west", 13.457)),
        "committed twice: an adopting agent lost the answer of the agent of its DC that "
        "took the task, could not delete the record it had changed, and refused the "
        "offer all the same; the origin ran the task too (fixed: a record that moved on is "
        "answered accepted)",
    ),
    Regression(
        125,
        200,
        (Fault(1.398, "agent-cut", "west-2", 13.732),),
        "a task PENDING for ever: a cancel written on an adopted record while it was being "
        "placed made the take-back fail, and the first fix of seed 181 read that as placed "
        "(fixed: Intake._take_back reads the record again; a cancelled one ends here)",
    ),
    Regression(
        725,
        200,
        (Fault(0.639, "etcd-down", "west", 4.409), Fault(5.853, "etcd-down", "east", 10.555)),
        "tasks lost: a hand-off in doubt settled as not held while the origin's etcd was "
        "down, and its take-back and placement failed once and were dropped; nobody else "
        "settles a live agent's hand-off, so the record pointed to a DC that pointed back "
        "(fixed: settle_later writes what the settle decided until the task's deadline)",
    ),
    Regression(
        892,
        200,
        (Fault(3.139, "etcd-down", "west", 2.747),),
        "a twin run: a Submit recorded and placed its task, then its read-back met etcd "
        "going down and it answered UNAVAILABLE; the client tried the other DC, which "
        "could not ask the id's home and ran a second copy (fixed: an accepted task is "
        "answered accepted, from the record the Submit wrote). Since seed 23 the checker "
        "excuses a twin whose Submit was under way as the fault began, as this one was: "
        "the schedule stays for the rest of what it drives",
    ),
    Regression(
        873,
        200,
        (Fault(2.357, "agent-cut", "west-2", 14.312), Fault(6.349, "owner-pause", "west", 4.585)),
        "tasks lost: an offer from the other DC reached a paused agent, whose adoption "
        "later failed and deleted the record; meanwhile the same offer, tried on another "
        "seed, was answered 'already here' from that half-adopted record, and the origin "
        "confirmed a pointer to nothing (fixed: a record still pending is answered "
        "UNAVAILABLE, so the origin settles)",
    ),
    Regression(
        714,
        200,
        (
            Fault(6.905, "slow-net", "west", 4.452),
            Fault(8.731, "etcd-down", "west", 11.052),
            Fault(9.016, "owner-pause", "west", 5.102),
        ),
        "a task lost: a refused hand-off could not be taken back (etcd down), and the queue "
        "owner, placing it on itself, read its own hand-off intent as its run; the run's "
        "start was then refused as handed over (fixed: only a queued or running record "
        "names the agent that runs it)",
    ),
    Regression(
        344,
        200,
        (
            Fault(5.701, "agent-cut", "west-1", 7.928),
            Fault(6.635, "crash", "east-2", 13.141),
            Fault(9.512, "owner-pause", "east", 6.98),
        ),
        "a Watch that never ended: twin Submits in each DC; one DC's hand-off was answered "
        "'already here' by the other's own copy while it was still being placed, and the "
        "two records came to point at each other (fixed with seed 873)",
    ),
    Regression(
        179,
        200,
        (Fault(4.021, "agent-cut", "west-3", 7.937),),
        "a Cancel answered PENDING, then the task succeeded: asked through the DC it was "
        "being handed to, the origin answered from the hand-off's holder, which does not "
        "hold the task (fixed: a cancel another DC forwards to an unconfirmed hand-off is "
        "answered UNAVAILABLE, as one asked here is)",
    ),
    Regression(
        737,
        200,
        (
            Fault(2.071, "pause", "west-1", 9.109),
            Fault(2.401, "lossy-net", "west", 13.824),
            Fault(3.692, "etcd-down", "west", 10.025),
        ),
        "a task lost: a Submit retried through the other DC found the record an adoption "
        "there was still placing and answered it as the existing task; the adoption then "
        "failed and took its record back (fixed: a record still being placed, by a Submit, "
        "an adoption or a hand-off, is answered UNAVAILABLE: the retry gets the outcome)",
    ),
    Regression(
        118,
        200,
        (Fault(1.699, "agent-cut", "west-3", 13.385),),
        "a Watch that never ended: a DC's copy of an id, cancelled as the twin of the "
        "origin's, answered the origin's settle of its own hand-off HELD, and the "
        "origin pointed to it (fixed: a copy that lost the id to the settling DC "
        "answers NOT_HELD)",
    ),
    Regression(
        50,
        200,
        (
            Fault(1.86, "dc-cut", "east", 5.26),
            Fault(8.661, "dc-cut", "east", 1.256),
        ),
        "a Watch that never ended: the reconcile of an unclaimed copy asked the id's "
        "home, which pointed to this very copy, and read it (being handed on at that "
        "moment, so naming the other DC) as a twin, and cancelled it (fixed: a status "
        "that is this DC's own record is not a twin)",
    ),
    Regression(
        1000,
        200,
        (
            Fault(0.744, "agent-cut", "east-3", 1.364),
            Fault(7.394, "agent-cut", "west-1", 14.949),
            Fault(9.871, "owner-pause", "east", 2.672),
        ),
        "a Watch that never ended, as seed 50 (fixed with it)",
    ),
    Regression(
        809,
        200,
        (
            Fault(4.355, "lossy-net", "east", 10.434),
            Fault(6.967, "etcd-down", "east", 3.265),
        ),
        "committed twice: a hand-off the other DC took, whose confirm met this DC's "
        "etcd going down, was read as a failed placement; placed again, the backlog's "
        "write cleared the hand-off and both DCs ran the task (fixed: once the other DC "
        "holds it, the confirm is written later, and the task is never placed again "
        "here)",
    ),
    Regression(
        209,
        100,
        (Fault(2.856, "owner-pause", "east", 6.725),),
        "ran twice at once: a paused owner woke, was offered a task, lost its lease and "
        "dropped it, was offered it again under its new lease (the record still named "
        "it) and ran it, then handed the dropped copy back, which moved the task to the "
        "other DC to run there too (fixed: a dropped job the agent holds again is not "
        "handed back)",
    ),
    Regression(
        503,
        200,
        (Fault(2.01, "pause", "east-1", 4.111), Fault(5.465, "etcd-unsure", "east", 10.702)),
        "a task QUEUED for ever on a live agent: the agent held attempt 1 waiting for "
        "quota (its offer had lost to another's), accepted attempt 2 from the owner, and "
        "when the stale attempt was dropped at its start, the new one went with it (both "
        "kept under one id) (fixed: an earlier attempt still waiting is withdrawn first)",
    ),
    Regression(
        6,
        200,
        (Fault(3.107, "dc-cut", "east", 12.876),),
        "refused yet run: a Submit retried in the other DC while the DCs were apart found "
        "only the pointer a settle had left there (the task lives in its origin), read its "
        "missing digest as another task's and answered ALREADY_EXISTS; the task ran "
        "(fixed: a pointer answers UNAVAILABLE, to retry where the task lives)",
    ),
    Regression(
        59,
        200,
        (Fault(3.706, "agent-cut", "east-3", 2.691), Fault(7.712, "pause", "west-3", 6.584)),
        "refused yet run: an agent paused while placing a Submit's task woke to find it "
        "re-queued as attempt 2 by the owner and answered ABORTED; the task ran (fixed: a "
        "record that moved on while its Submit placed it is the answer)",
    ),
    Regression(
        218,
        200,
        (
            Fault(1.814, "etcd-down", "east", 7.519),
            Fault(5.047, "slow-net", "east", 11.107),
            Fault(9.839, "etcd-unsure", "west", 8.015),
        ),
        "a task QUEUED for ever on a live agent that held nothing: a settle placed it again "
        "while another placement had put it in the backlog; its hand-off intent was "
        "written over the backlogged record, the take-back read the intent's agent as a "
        "taker, and the owner dropped the entry of a record naming an agent (fixed: a "
        "placement's write finds a backlogged task placed)",
    ),
)
