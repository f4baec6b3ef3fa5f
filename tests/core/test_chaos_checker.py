"""The chaos checker on hand-written histories: each invariant is shown to catch its
violation, so a clean verdict from the suite means something."""

from __future__ import annotations

from chaos.checker import Observed, Term, check, check_watches, error_rate, leader_at, runs
from chaos.observe import terms_from
from mesh.store import kv

AGENTS = {"west": {"w1", "w2"}}


def ev(mono: float, op: str, phase: str, agent: str = "w1", **fields: object) -> dict:
    return {"op": op, "phase": phase, "agent": agent, "dc": "west", "mono": mono, **fields}


def submitted(key: str, at: float = 0.0) -> list[dict]:
    return [
        ev(at, "submit", "invoke", "client", key=key),
        ev(at + 0.01, "submit", "ok", "client", key=key, task=key),
    ]


def ran(
    task: str, agent: str, start: float, end: float | None, attempt: int = 1, **who: object
) -> list[dict]:
    events = [ev(start, "run", "start", agent, task=task, attempt=attempt, **who)]
    if end is not None:
        events.append(ev(end, "run", "end", agent, task=task, attempt=attempt, how="SUCCEEDED"))
    return events


def observe(events: list[dict], records: dict | None = None, **kw: object) -> Observed:
    events = sorted(events, key=lambda e: e["mono"])
    return Observed(
        events=events,
        records=records if records is not None else {},
        terms=kw.get("terms", {"west": [Term(5, "w1")]}),  # type: ignore[arg-type]
        membership=kw.get("membership", AGENTS),  # type: ignore[arg-type]
        expected=AGENTS,
        settle_s=kw.get("settle_s", 60.0),  # type: ignore[arg-type]
        split=kw.get("split", {}),  # type: ignore[arg-type]
        fault=kw.get("fault", (0.0, 0.0)),  # type: ignore[arg-type]
        caps=kw.get("caps", {}),  # type: ignore[arg-type]
    )


def done(attempt: int = 1, state: str = "SUCCEEDED") -> dict:
    return {"state": state, "attempt": attempt, "dc": "west", "agent": "w1"}


def test_a_moved_task_must_join_its_new_queue_with_the_wait_it_had() -> None:
    events = [
        *submitted("t1"),
        ev(1.00, "queue", "moved in", "w2", task="t1", attempt=1, waited=2.5),
        ev(1.01, "queue", "moved", "w1", task="t1", attempt=1, to="w2", waited=2.5),
    ]
    assert check(observe(events, {"t1": done()})).ok
    events[-2]["waited"] = 0.0  # queued there as a newcomer: behind its tenant's later tasks
    (violation,) = check(observe(events, {"t1": done()})).violations
    assert violation.startswith("moved without its place: t1 waited 2.500s on w1")
    del events[-2]  # never arrived in the history at all
    assert not check(observe(events, {"t1": done()})).ok


def test_a_task_whose_submit_was_refused_for_good_must_never_run() -> None:
    refused = [
        ev(0.0, "submit", "invoke", "client", key="t1"),
        ev(1.0, "submit", "fail", "client", key="t1", code="ABORTED"),
        *ran("t1", "w1", 2.0, 3.0),
    ]
    (violation,) = check(observe(refused, {"t1": done()})).violations
    assert violation == "refused yet run: t1 was refused ABORTED, then ran"
    refused[1]["code"] = "UNAVAILABLE"  # says nothing either way: it may run
    assert check(observe(refused, {"t1": done()})).ok
    refused[1]["code"] = "ALREADY_EXISTS"  # refused, then a retry was accepted: fine
    retried = [*refused, ev(1.5, "submit", "ok", "client", key="t1", task="t1")]
    assert check(observe(retried, {"t1": done()})).ok


def test_a_clean_history_passes_and_counts() -> None:
    events = [
        *submitted("a"),
        *ran("a", "w1", 1, 2),
        ev(2.1, "commit", "ok", task="a", attempt=1, rev=10),
        *submitted("b"),
        ev(0.5, "submit", "invoke", "client", key="c"),
        ev(0.6, "submit", "fail", "client", key="c", code="INVALID_ARGUMENT"),
    ]
    verdict = check(observe(events, {"a": done(), "b": done(state="FAILED")}))
    assert verdict.ok, verdict.violations
    assert (verdict.submitted, verdict.succeeded, verdict.failed, verdict.rejected) == (3, 1, 1, 1)


def test_an_accepted_task_that_never_ends_or_has_no_record_is_lost() -> None:
    events = [*submitted("a"), *submitted("b")]
    verdict = check(observe(events, {"a": {**done(), "state": "RUNNING"}}, settle_s=30))
    assert verdict.lost == 2
    assert sorted(verdict.violations) == [
        "liveness: a is still RUNNING 30s after the fault cleared",
        "lost: b has no record",
    ]


def test_a_task_whose_submit_was_never_answered_must_still_end() -> None:
    events = [ev(0, "submit", "invoke", "client", key="a")]
    assert check(observe(events, {"a": {**done(), "state": "QUEUED"}})).lost == 1


def test_two_commits_and_a_stale_commit_are_caught() -> None:
    events = [
        *submitted("a"),
        ev(2, "commit", "ok", "w1", task="a", attempt=1, rev=10),
        ev(3, "commit", "ok", "w2", task="a", attempt=2, rev=11),
        *submitted("b"),
        ev(2, "commit", "ok", "w1", task="b", attempt=1, rev=12),
    ]
    verdict = check(observe(events, {"a": done(attempt=2), "b": done(attempt=2)}))
    assert verdict.committed_twice == 1
    assert any(v.startswith("stale commit: b") for v in verdict.violations)


def test_two_live_runs_at_once_are_a_duplicate() -> None:
    events = [*submitted("a"), *ran("a", "w1", 1, 3), *ran("a", "w2", 2, 4)]
    verdict = check(observe(events, {"a": done()}))
    assert verdict.duplicates == 1


def test_a_run_after_its_agent_was_killed_is_no_duplicate() -> None:
    events = [
        *submitted("a"),
        *ran("a", "w1", 1, None),  # SIGKILLed: no end
        ev(1.5, "fault", "kill", "harness", target="w1"),
        *ran("a", "w2", 5, 6, attempt=2),
    ]
    verdict = check(observe(events, {"a": done(attempt=2)}))
    assert verdict.duplicates == 0, verdict.violations


def test_a_paused_run_written_off_is_a_zombie_not_a_duplicate() -> None:
    events = [
        *submitted("a"),
        *ran("a", "w1", 1, 9),  # paused at 1.5, woke at 8.75, dropped its run at 9
        ev(1.5, "fault", "stop", "harness", target="w1"),
        ev(8.75, "fault", "cont", "harness", target="w1"),
        ev(4, "requeue", "requeued", "w2", task="a", attempt=2, dead="w1", token=5, rev=20),
        *ran("a", "w2", 4.5, 6, attempt=2),
    ]
    verdict = check(observe(events, {"a": done(attempt=2)}))
    assert verdict.duplicates == 0, verdict.violations
    assert verdict.zombie_s == 0.25  # awake after its write-off: from the SIGCONT to its end
    # Without the owner's write-off, the same overlap is a duplicate.
    unexplained = [e for e in events if e["op"] != "requeue"]
    assert check(observe(unexplained, {"a": done(attempt=2)})).duplicates == 1


def test_runs_pair_starts_and_ends_per_agent_and_attempt() -> None:
    found = runs([*ran("a", "w1", 1, 2), *ran("a", "w1", 3, 4, attempt=2)])
    assert [(r.attempt, r.start, r.end) for r in found] == [(1, 1, 2), (2, 3, 4)]


def test_the_leader_at_a_revision_is_the_oldest_live_candidate() -> None:
    terms = [Term(5, "w1", deleted_rev=30), Term(7, "w2")]
    assert leader_at(terms, 6).holder == "w1"  # type: ignore[union-attr]
    assert leader_at(terms, 29).holder == "w1"  # type: ignore[union-attr]
    assert leader_at(terms, 30).holder == "w2"  # type: ignore[union-attr]
    assert leader_at(terms, 4) is None


def test_owner_writes_must_carry_the_current_token_and_tokens_only_grow() -> None:
    terms = {"west": [Term(5, "w1", deleted_rev=30), Term(7, "w2")]}
    good = [
        ev(1, "claim", "ok", "w1", task="a", token=5, rev=10),
        ev(2, "requeue", "requeued", "w2", task="b", token=7, rev=31),
        ev(3, "claim", "rejected", "w1", task="c", token=5),  # refused: not a write
    ]
    assert check(observe(good, terms=terms)).ok
    deposed = [ev(1, "claim", "ok", "w1", task="a", token=5, rev=31)]
    assert any("carried token 5" in v for v in check(observe(deposed, terms=terms)).violations)
    backwards = [
        ev(1, "claim", "ok", "w2", task="a", token=7, rev=31),
        ev(2, "claim", "ok", "w1", task="b", token=5, rev=32),
    ]
    assert any("token went down" in v for v in check(observe(backwards, terms=terms)).violations)


def test_membership_must_be_restored() -> None:
    verdict = check(observe([], membership={"west": {"w1"}}))
    assert verdict.violations == ["membership of west not restored: missing ['w2'], unexpected []"]


def test_error_rate_counts_the_submits_whose_caller_saw_an_error() -> None:
    events = [
        ev(1, "submit", "invoke", "client", key="a"),
        ev(1.4, "submit", "ok", "client", key="a"),
        ev(1.5, "submit", "invoke", "client", key="b"),
        ev(2.5, "submit", "fail", "client", key="b", code="UNAVAILABLE"),  # after the window
        ev(9, "submit", "invoke", "client", key="c"),
    ]
    assert error_rate(events, 0, 2) == 0.5
    assert error_rate(events, 10, 11) is None


def test_every_watch_ends_with_the_state_its_record_holds() -> None:
    records: dict[str, dict[str, object]] = {
        k: {"state": "SUCCEEDED"} for k in ("fine", "broke", "open", "wrong")
    }
    events = [ev(1, "watch", "invoke", "client", key=k) for k in records]
    events += [
        ev(2, "watch", "ok", "client", key="fine", state="SUCCEEDED"),
        ev(2, "watch", "fail", "client", key="broke", code="INTERNAL", detail="internal error"),
        ev(2, "watch", "ok", "client", key="wrong", state="FAILED"),
    ]
    problems = check_watches(events, records)
    assert len(problems) == 3
    assert [p.split()[2] for p in problems] == ["broke", "open", "wrong"]


def test_an_id_split_between_dcs_is_counted_in_the_fault_and_a_violation_outside_it() -> None:
    events = [*submitted("apart", at=10), *submitted("together", at=1)]
    for key, at in (("apart", 10), ("together", 1)):  # ran in both DCs, one commit each
        for agent in ("w1", "e1"):
            events += ran(key, agent, at + 1, at + 2)
            events.append(ev(at + 2.1, "commit", "ok", agent, task=key, attempt=1))
    split = {"apart": ["east", "west"], "together": ["east", "west"]}
    records = {"apart": done(), "together": done()}
    verdict = check(observe(events, records, split=split, fault=(9.0, 12.0)))
    assert (verdict.split_ids, verdict.split_ran_twice) == (1, 1)
    assert any("together is recorded in east and west" in v for v in verdict.violations)
    assert not any("apart" in v for v in verdict.violations), verdict.violations


CAPS = {("user", "vision", "ada"): 2, ("group", "vision", ""): 3}


def test_no_cap_may_be_exceeded_even_for_an_instant() -> None:
    ada = {"user": "ada", "group": "vision", "gpus": 1}
    bob = {"user": "bob", "group": "vision", "gpus": 1}
    keys = ["a", "b", "c", "d"]
    fine = [
        *(e for k in keys for e in submitted(k)),
        *ran("a", "w1", 1, 3, **ada),
        *ran("b", "w2", 2, 4, **ada),
        *ran("c", "w1", 3, 5, **ada),  # starts as "a" ends: never three at once
        *ran("d", "w2", 2.5, 6, **bob),  # the group at 3 of 3
    ]
    records = {k: done() for k in keys}
    assert check(observe(fine, records, caps=CAPS)).ok
    over = [e for e in fine if e.get("task") != "c"] + ran("c", "w1", 2.9, 5, **ada)
    assert check(observe(over, records, caps=CAPS)).violations == [
        "cap exceeded in west: group vision held 4 GPUs, cap 3",
        "cap exceeded in west: user ada held 3 GPUs, cap 2",
    ]


def test_a_frozen_agents_run_stops_counting_against_caps_at_its_freeze() -> None:
    ada = {"user": "ada", "group": "vision", "gpus": 2}
    events = [
        *submitted("a"),
        *submitted("b"),
        *ran("a", "w1", 1, 9, **ada),
        ev(1.5, "fault", "stop", "harness", target="w1"),
        ev(8.75, "fault", "cont", "harness", target="w1"),
        ev(4, "requeue", "requeued", "w2", task="a", attempt=2, dead="w1", token=5, rev=20),
        *ran("b", "w2", 3, 6, **ada),  # its lease gone, w1's slots were free again
    ]
    assert not check(observe(events, {"a": done(), "b": done()}, caps=CAPS)).violations


def test_a_cancel_answered_unfinished_must_not_be_followed_by_a_success() -> None:
    from chaos.checker import check_cancels

    def events(commit_at: float) -> list[dict[str, object]]:
        return [
            {"op": "cancel", "phase": "ok", "key": "t", "state": "QUEUED", "mono": 2.0},
            {"op": "commit", "phase": "ok", "task": "t", "state": "SUCCEEDED", "mono": commit_at},
        ]

    succeeded = {"t": {"state": "SUCCEEDED", "attempt": 1, "dc": "west", "agent": "a"}}
    assert check_cancels(events(3.0), succeeded, set())  # after the answer: a breach
    assert not check_cancels(events(1.5), succeeded, set())  # overlapped: no breach
    assert not check_cancels(events(3.0), succeeded, {"t"})  # two tasks of one id
    cancelled = {"t": {**succeeded["t"], "state": "CANCELLED"}}
    assert not check_cancels(events(3.0)[:1], cancelled, set())


def test_an_election_key_used_again_makes_a_second_term() -> None:
    """Simulator seed 133: an owner resigned and campaigned again under the same lease,
    so the same key made a second term; the checker kept only the first and called the
    second term's fenced writes tokens of nobody."""

    def event(kind: kv.EventKind, key: bytes, create: int, mod: int, value: bytes) -> kv.Event:
        return kv.Event(kind, kv.KeyValue(key, value, create, mod, 1, 0))

    events = [
        event(kv.EventKind.PUT, b"e/1001", 7, 7, b"east-1 x"),
        event(kv.EventKind.PUT, b"e/1002", 8, 8, b"east-2 x"),
        event(kv.EventKind.DELETE, b"e/1001", 0, 273, b""),
        event(kv.EventKind.PUT, b"e/1001", 357, 357, b"east-1 x"),
        event(kv.EventKind.DELETE, b"e/1002", 0, 778, b""),
    ]
    terms = terms_from(events)
    assert terms == [Term(7, "east-1", 273), Term(8, "east-2", 778), Term(357, "east-1", None)]
    assert leader_at(terms, 779) == Term(357, "east-1", None)


def test_an_id_each_dc_answered_while_apart_may_run_in_both_though_merged_after() -> None:
    """Simulator seed 123: twins answered by each DC during a cut ran in both; once the
    DCs could talk, one copy became a pointer to the other, so no id was left recorded
    twice, and the overlap read as a task run twice at once."""
    events = []
    for key, at in (("apart", 10.0), ("together", 1.0)):
        events += [ev(at, "submit", "invoke", "client", key=key)] * 2
        events += [
            {**ev(at + 0.01, "submit", "ok", "client", key=key), "dc": dc}
            for dc in ("west", "east")
        ]
        events += [*ran(key, "w1", at + 1, at + 2), *ran(key, "e1", at + 1.5, at + 2.5)]
    records = {"apart": done(), "together": done()}
    verdict = check(observe(events, records, fault=(9.0, 12.0)))
    assert verdict.split_ids == 1
    assert not any("apart" in v for v in verdict.violations), verdict.violations
    assert any("ran twice at once: together" in v for v in verdict.violations)


def test_a_backlog_is_stuck_only_while_idle_slots_wait_and_nothing_leaves_it() -> None:
    """Seeds 5 and 6 of the full burst: a backlog of hundreds draining while a slot or
    two stood free between samples read as stuck; only one nobody takes from is."""
    from types import SimpleNamespace

    from chaos.scenarios import backlog_kept_moving

    samples = [
        {**ev(t / 2, "sample", "backlog", "chaos"), "depth": 50, "idle": 1} for t in range(20)
    ]
    taken = [
        {**ev(t / 2 + 0.25, "claim", "ok", "w1"), "task": f"t{t}", "token": 1} for t in range(20)
    ]
    staged = SimpleNamespace(notes=[])
    assert backlog_kept_moving(sorted(samples + taken, key=lambda e: e["mono"]), staged, 3) == []
    stuck = backlog_kept_moving(samples, SimpleNamespace(notes=[]), 3)
    assert stuck == ["west's backlog held tasks for 9.5s while it had idle slots"]


def test_a_submit_under_way_as_the_fault_began_may_split_the_id() -> None:
    """Simulator seed 23: twins sent through each DC as the cut began; the one in the DC
    away from the id's home waited for the home, timed out, and recorded it too. It was
    under way in the fault, though sent before it began; one answered before the fault
    began is no such trade."""
    events = []
    for key, sent, answered in (("in_flight", 8.9, 11.9), ("before", 8.0, 8.5)):
        events += [
            ev(sent, "submit", "invoke", "client", key=key),
            {**ev(answered, "submit", "ok", "client", key=key), "dc": "east"},
        ]
    split = {"in_flight": ["east", "west"], "before": ["east", "west"]}
    records = {"in_flight": done(), "before": done()}
    verdict = check(observe(events, records, split=split, fault=(9.0, 12.0)))
    assert verdict.split_ids == 1
    assert any("before is recorded in east and west" in v for v in verdict.violations)
    assert not any("in_flight" in v for v in verdict.violations), verdict.violations


def test_a_write_applied_before_the_pause_is_not_the_woken_owners() -> None:
    """Chaos seed 6, owner-stop: the owner's claim applied at revision 146 was recorded
    only when the stopped process woke, after its successor's writes at 214 and on; the
    first write it made awake (rejected) is the one the fence is judged by."""
    from types import SimpleNamespace

    from chaos.scenarios import fenced_on_waking

    def claim(at: float, agent: str, phase: str, **fields: object) -> dict:
        return {**ev(at, "claim", phase, agent), "task": "t", "token": 6, **fields}

    events = [
        claim(7.0, "w3", "ok", rev=214),
        claim(9.3, "w1", "ok", rev=146),
        claim(9.4, "w1", "rejected"),
    ]
    staged = SimpleNamespace(notes=[], victim="w1", heal=9.2, dc="west")
    assert fenced_on_waking(events, staged, 3) == []
    assert staged.notes == ["woken owner's first write (claim, token 6) was rejected"]
    events[1]["rev"] = 300  # written awake, and it held: the fence failed
    assert fenced_on_waking(events, SimpleNamespace(**{**vars(staged), "notes": []}), 3)
