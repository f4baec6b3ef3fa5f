"""The invariants, checked from what was recorded: pure functions of the history.

Input is one timeline (``Observed``): the JSON-line events that agents, the load
generator and the fault schedule wrote (all stamped with the machine's monotonic clock),
the final task records of every DC, each DC's election history from etcd, and its
membership at the end. Nothing here starts a process, so a wrong verdict is reproduced
from the saved files alone (``python -m chaos check DIR``).

A run is *live* from its start until it ends, its agent is killed, or the DC's owner
writes it off (re-queues it because the agent's lease expired). Two live runs of one task
at once are a concurrent duplicate. A run that goes on after it was written off (its
agent was paused, then woke) is a *zombie*: not a duplicate, but its writes must all be
refused, which the single-commit check proves, and how long it lived is reported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
OWNER_WRITES = {"claim", "requeue"}

Event = dict[str, object]


@dataclass(frozen=True, slots=True)
class Term:
    """One queue owner's term: its election key's create revision, until it was deleted."""

    token: int
    holder: str
    deleted_rev: int | None = None


@dataclass
class Observed:
    events: list[Event]
    records: dict[str, dict[str, object]]  # task id: {"state", "attempt", "dc", "agent"}
    terms: dict[str, list[Term]]  # per DC
    membership: dict[str, set[str]]  # per DC, at the end
    expected: dict[str, set[str]]  # per DC
    extra_violations: list[str] = field(default_factory=list)
    settle_s: float = 60.0  # the records were read this long after the fault cleared
    split: dict[str, list[str]] = field(default_factory=dict)  # ids recorded in two DCs
    fault: tuple[float, float] = (0.0, 0.0)  # when it began, when it cleared
    caps: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (scope, group, name)


@dataclass(frozen=True, slots=True)
class Run:
    task: str
    agent: str
    attempt: int
    start: float
    end: float  # when it stopped executing (its end, or its agent's death)
    live_end: float  # when it stopped being the mesh's run of the task
    zombie_s: float = 0.0  # awake time between the two: it executed, written off
    dc: str = ""
    user: str = ""
    group: str = ""
    gpus: int = 1
    held_end: float = 0.0  # live, and its agent not frozen: it counts against its caps


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


@dataclass
class Verdict:
    submitted: int = 0
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0  # never accepted: the client gave up after its retries
    lost: int = 0
    duplicates: int = 0
    committed_twice: int = 0
    split_ids: int = 0  # ids two DCs accepted while they could not talk
    split_ran_twice: int = 0  # of those, how many ran in both
    zombie_s: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def read_events(directory: Path) -> list[Event]:
    """Every history file under ``directory``, merged in time order."""
    events: list[Event] = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a SIGKILL
    events.sort(key=lambda e: float(e["mono"]))  # type: ignore[arg-type]
    return events


def select(
    events: Iterable[Event], op: str, phase: str | None = None, **match: object
) -> Iterator[Event]:
    for event in events:
        if event["op"] != op or (phase is not None and event["phase"] != phase):
            continue
        if all(event.get(k) == v for k, v in match.items()):
            yield event


def first_after(
    events: Iterable[Event], after: float, op: str, phase: str | None = None, **match: object
) -> float | None:
    for event in select(events, op, phase, **match):
        if float(event["mono"]) >= after:  # type: ignore[arg-type]
            return float(event["mono"])  # type: ignore[arg-type]
    return None


def runs(events: list[Event]) -> list[Run]:
    """Every run that started, with the times it stopped executing and being live."""
    horizon = float(events[-1]["mono"]) if events else 0.0  # type: ignore[arg-type]
    deaths: dict[str, list[float]] = defaultdict(list)
    for event in select(events, "fault", "kill"):
        deaths[str(event["target"])].append(float(event["mono"]))  # type: ignore[arg-type]
    frozen: dict[str, list[tuple[float, float]]] = defaultdict(list)  # SIGSTOP to SIGCONT
    for event in select(events, "fault", "stop"):
        target, at = str(event["target"]), float(event["mono"])  # type: ignore[arg-type]
        woke = first_after(events, at, "fault", "cont", target=target)
        frozen[target].append((at, horizon if woke is None else woke))
    written_off: dict[tuple[str, str], list[float]] = defaultdict(list)  # (task, dead agent)
    for event in select(events, "requeue", "requeued"):
        written_off[(str(event["task"]), str(event.get("dead")))].append(float(event["mono"]))  # type: ignore[arg-type]
    open_runs: dict[tuple[str, str, int], Event] = {}
    found: list[tuple[str, str, int, Event, float | None]] = []
    for event in events:
        if event["op"] != "run":
            continue
        key = (str(event["task"]), str(event["agent"]), int(event["attempt"]))  # type: ignore[arg-type]
        if event["phase"] == "start":
            open_runs[key] = event
        elif event["phase"] == "end" and key in open_runs:
            found.append((*key, open_runs.pop(key), float(event["mono"])))  # type: ignore[arg-type]
    found.extend((*key, began, None) for key, began in open_runs.items())
    result = []
    for task, agent, attempt, began, end in found:
        start = float(began["mono"])  # type: ignore[arg-type]
        killed = min((t for t in deaths[agent] if t >= start), default=None)
        stopped = min(x for x in (end, killed, horizon) if x is not None)
        offs = written_off.get((task, agent), ())
        off = next((t for t in offs if t >= start), None)  # in time order, as events are
        live_end = min(stopped, off) if off is not None else stopped
        undead = (live_end, stopped)
        zombie = undead[1] - undead[0] - sum(_overlap(undead, f) for f in frozen[agent])
        # A frozen agent's lease lapses, and its quota slots with it: from its freeze its
        # run no longer counts against the caps (should it wake, it is a zombie).
        freeze = min((at for at, _ in frozen[agent] if at >= start), default=live_end)
        result.append(
            Run(
                task, agent, attempt, start, stopped, live_end, max(0.0, zombie),
                str(began.get("dc", "")), str(began.get("user", "")),
                str(began.get("group", "")), int(began.get("gpus", 1)),  # type: ignore[arg-type]
                min(live_end, freeze),
            )
        )  # fmt: skip
    return result


def check_caps(all_runs: list[Run], caps: dict[tuple[str, str, str], int]) -> list[str]:
    """No cap was ever exceeded: per DC, the GPUs of the live runs counted against a cap
    (``("user", group, user)`` or ``("group", group, "")``) never go above its limit."""
    problems = []
    edges: dict[tuple[str, tuple[str, str, str]], list[tuple[float, int]]] = defaultdict(list)
    for run in all_runs:
        for cap in (("user", run.group, run.user), ("group", run.group, "")):
            if cap in caps:
                edges[(run.dc, cap)] += [(run.start, run.gpus), (run.held_end, -run.gpus)]
    for (dc, cap), changes in sorted(edges.items()):
        held = peak = 0
        for _, delta in sorted(changes, key=lambda c: (c[0], c[1])):  # ends before starts
            held += delta
            peak = max(peak, held)
        if peak > caps[cap]:
            who = f"user {cap[2]}" if cap[0] == "user" else f"group {cap[1]}"
            problems.append(f"cap exceeded in {dc}: {who} held {peak} GPUs, cap {caps[cap]}")
    return problems


def concurrent(task_runs: list[Run]) -> list[tuple[Run, Run]]:
    ordered = sorted(task_runs, key=lambda r: r.start)
    return [
        (a, b)
        for i, a in enumerate(ordered)
        for b in ordered[i + 1 :]
        if b.start < a.live_end and a.start < b.live_end
    ]


def leader_at(terms: list[Term], revision: int) -> Term | None:
    """The owner at ``revision``: the oldest candidate whose key then existed."""
    alive = [
        t for t in terms
        if t.token <= revision and (t.deleted_rev is None or revision < t.deleted_rev)
    ]  # fmt: skip
    return min(alive, key=lambda t: t.token, default=None)


def check_tokens(events: list[Event], terms: dict[str, list[Term]]) -> list[str]:
    """Every successful owner write carried the token of the owner at its revision, and
    per DC the tokens of successful writes, in revision order, never go down."""
    problems = []
    by_dc: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        if event["op"] in OWNER_WRITES and event["phase"] != "rejected" and "rev" in event:
            by_dc[str(event["dc"])].append(event)
    for dc, writes in by_dc.items():
        writes.sort(key=lambda e: int(e["rev"]))  # type: ignore[arg-type]
        highest = 0
        for write in writes:
            token, revision = int(write["token"]), int(write["rev"])  # type: ignore[arg-type]
            leader = leader_at(terms.get(dc, []), revision)
            if leader is None or leader.token != token:
                problems.append(
                    f"{dc}: {write['op']} of {write.get('task')} at revision {revision} carried "
                    f"token {token}; the owner then held {leader.token if leader else 'none'}"
                )
            if token < highest:
                problems.append(f"{dc}: token went down from {highest} to {token} at {revision}")
            highest = max(highest, token)
    return problems


def check(observed: Observed) -> Verdict:
    events = observed.events
    verdict = Verdict(violations=list(observed.extra_violations))
    submitted = {str(e["key"]) for e in select(events, "submit", "invoke")}
    accepted = {str(e["key"]) for e in select(events, "submit", "ok")}
    verdict.submitted, verdict.accepted = len(submitted), len(accepted)
    verdict.rejected = len(submitted - accepted)
    records = observed.records
    # A submit whose answer was lost may still have created its task: it must end too.
    for key in sorted(accepted | (submitted & records.keys())):
        record = records.get(key)
        if record is None:
            verdict.lost += 1
            verdict.violations.append(f"lost: {key} has no record")
            continue
        state = str(record["state"])
        if state not in TERMINAL:
            verdict.lost += 1
            verdict.violations.append(
                f"liveness: {key} is still {state} {observed.settle_s:g}s after the fault cleared"
            )
        elif key in accepted:
            if state == "SUCCEEDED":
                verdict.succeeded += 1
            else:
                verdict.failed += 1

    forgiven = split_in_fault(observed, verdict)
    commits: dict[str, list[Event]] = defaultdict(list)
    for event in select(events, "commit", "ok"):
        commits[str(event["task"])].append(event)
    for task, done in commits.items():
        if task in forgiven:
            verdict.split_ran_twice += len(done) > 1
            continue
        if len(done) > 1:
            verdict.committed_twice += 1
            verdict.violations.append(
                f"committed twice: {task} by "
                + ", ".join(f"{e['agent']}#{e['attempt']}" for e in done)
            )
        record = records.get(task)
        if record and int(done[-1]["attempt"]) != int(record["attempt"]):  # type: ignore[arg-type]
            verdict.violations.append(
                f"stale commit: {task} attempt {done[-1]['attempt']} committed, "
                f"the record is at attempt {record['attempt']}"
            )

    by_task: dict[str, list[Run]] = defaultdict(list)
    all_runs = runs(events)
    verdict.violations.extend(check_caps(all_runs, observed.caps))
    for run in all_runs:
        by_task[run.task].append(run)
        verdict.zombie_s = max(verdict.zombie_s, run.zombie_s)
    for task, task_runs in sorted(by_task.items()):
        overlaps = [] if task in forgiven else concurrent(task_runs)
        if overlaps:
            verdict.duplicates += 1
            a, b = overlaps[0]
            verdict.violations.append(
                f"ran twice at once: {task} on {a.agent}#{a.attempt} and {b.agent}#{b.attempt} "
                f"for {min(a.live_end, b.live_end) - b.start:.3f}s"
            )

    verdict.violations.extend(check_tokens(events, observed.terms))
    verdict.violations.extend(check_moves(events))
    verdict.violations.extend(check_refusals(events))
    verdict.violations.extend(check_cancels(events, records, forgiven))
    verdict.violations.extend(check_watches(events, records, forgiven))
    for dc, expected in observed.expected.items():
        seen = observed.membership.get(dc, set())
        if seen != expected:
            verdict.violations.append(
                f"membership of {dc} not restored: missing {sorted(expected - seen)}, "
                f"unexpected {sorted(seen - expected)}"
            )
    return verdict


SPLIT_GRACE_S = 5.0  # a Submit sent just before the fault cleared may still be in flight


def split_in_fault(observed: Observed, verdict: Verdict) -> set[str]:
    """Ids recorded in two DCs. One whose Submit was under way while the fault kept the
    DCs apart (its home could not be asked) is the trade the mesh makes to keep accepting
    work: counted, and excused from the one-run checks. Any other is a violation. An id
    each DC answered for while apart is excused too, though the DCs merged the two into
    one record once they could talk (its runs while apart may overlap). A Submit is under
    way from its first try to its answer: one sent just before the fault began is still
    asking the id's home, or tried again through the other DC, while it lasts."""
    start, cleared = observed.fault
    during = _submitting(observed.events)
    answered: dict[str, set[str]] = defaultdict(set)
    for event in select(observed.events, "submit", "ok"):
        answered[str(event["key"])].add(str(event["dc"]))
    merged = {k: sorted(dcs) for k, dcs in answered.items() if len(dcs) > 1}
    forgiven = set()
    for key, dcs in sorted((merged | observed.split).items()):
        in_fault = any(
            sent <= cleared + SPLIT_GRACE_S and ended >= start for sent, ended in during[key]
        )
        if in_fault:
            verdict.split_ids += 1
            forgiven.add(key)
        elif key in observed.split:
            verdict.violations.append(
                f"{key} is recorded in {' and '.join(dcs)}: two tasks for one id while "
                "the DCs could talk"
            )
    return forgiven


def _submitting(events: list[Event]) -> dict[str, list[tuple[float, float]]]:
    """Per id, when each of its Submits was under way: from the first try to the answer
    (to the end of the history, for one never answered)."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    open_since: dict[str, list[float]] = defaultdict(list)
    for event in select(events, "submit"):
        key, at = str(event["key"]), float(event["mono"])  # type: ignore[arg-type]
        if event["phase"] == "invoke":
            open_since[key].append(at)
        elif open_since[key]:
            spans[key].append((open_since[key].pop(0), at))
    for key, starts in open_since.items():
        spans[key] += [(at, float("inf")) for at in starts]
    return spans


# A Submit answered with one of these was refused for good: its client will not retry,
# so its task must not run. UNAVAILABLE and DEADLINE_EXCEEDED say nothing either way.
UNSURE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", ""})


def check_refusals(events: list[Event]) -> list[str]:
    """A task whose Submit was refused for good (and never accepted on a retry) never
    runs: its client was told it would not."""
    accepted = {str(e["key"]) for e in select(events, "submit", "ok")}
    refused = {
        str(e["key"]): str(e.get("code", ""))
        for e in select(events, "submit", "fail")
        if str(e.get("code", "")) not in UNSURE_CODES and str(e["key"]) not in accepted
    }
    ran = {str(e["task"]) for e in select(events, "run", "start")} & refused.keys()
    return [f"refused yet run: {t} was refused {refused[t]}, then ran" for t in sorted(ran)]


def check_moves(events: list[Event]) -> list[str]:
    """A task work conservation moved keeps its place in its tenant's share: the agent it
    moved to queued it with the wait it had behind it (``queue moved`` on the agent it
    left, ``queue moved in`` on the one it joined, for that attempt). It never runs twice
    for it: that is the runs' check, which moves go through like any other placement."""
    arrived: dict[tuple[str, str, int], float] = {}
    for event in select(events, "queue", "moved in"):
        key = (str(event["task"]), str(event["agent"]), int(event["attempt"]))  # type: ignore[arg-type]
        arrived[key] = max(arrived.get(key, 0.0), float(event["waited"]))  # type: ignore[arg-type]
    found = []
    for event in select(events, "queue", "moved"):
        task, waited = str(event["task"]), float(event["waited"])  # type: ignore[arg-type]
        key = (task, str(event["to"]), int(event["attempt"]))  # type: ignore[arg-type]
        if waited > 1e-6 and arrived.get(key, 0.0) < waited - 1e-6:  # none: no place to keep
            found.append(
                f"moved without its place: {task} waited {waited:.3f}s on {event['agent']}, "
                f"queued on {event['to']} as if it had waited {arrived.get(key, 0.0):.3f}s"
            )
    return found


def check_cancels(
    events: list[Event], records: dict[str, dict[str, object]], forgiven: set[str]
) -> list[str]:
    """A Cancel answered while the task had not ended must end it: the task never
    succeeds after the answer (its caller was told it had not finished). A success
    committed while the Cancel was on its way is no breach: the two overlapped. An id two
    DCs accepted while apart (``forgiven``) is two tasks: a Cancel reaches the one it
    reaches."""
    succeeded: dict[str, float] = {}
    for commit in select(events, "commit", "ok"):
        if commit.get("state") == "SUCCEEDED":
            succeeded.setdefault(str(commit["task"]), float(commit["mono"]))  # type: ignore[arg-type]
    found = []
    for event in select(events, "cancel", "ok"):
        key, state = str(event["key"]), str(event.get("state"))
        if key in forgiven or state in TERMINAL:
            continue
        record = records.get(key)
        if record is None or record["state"] != "SUCCEEDED":
            continue
        if succeeded.get(key, float("inf")) > float(event["mono"]):  # type: ignore[arg-type]
            found.append(f"cancel ignored: {key} was {state} when cancelled, then SUCCEEDED")
    return found


def check_watches(
    events: list[Event], records: dict[str, dict[str, object]], split: set[str] = frozenset()
) -> list[str]:
    """Every watch the clients opened ended with its task's terminal event, whichever
    agents died under it: the state it saw last is the one the record holds (for an id
    ``split`` between two DCs, either copy's)."""
    problems = []
    ended = {str(e["key"]): e for e in events if e["op"] == "watch" and e["phase"] != "invoke"}
    for opened in select(events, "watch", "invoke"):
        key = str(opened["key"])
        end, record = ended.get(key), records.get(key)
        if end is None:
            problems.append(
                f"watch of {key} never ended (its task is {record and record['state']})"
            )
        elif end["phase"] == "fail":
            problems.append(f"watch of {key} broke: {end['code']} {end['detail']}")
        elif record is not None and end["state"] != record["state"] and key not in split:
            problems.append(f"watch of {key} ended {end['state']}, its record is {record['state']}")
    return problems


def error_rate(events: list[Event], start: float, end: float) -> float | None:
    """Share of the Submits sent in [start, end] whose caller saw an error (the SDK's
    own retries inside one Submit are not the caller's)."""
    sent = {
        str(e["key"])
        for e in select(events, "submit", "invoke")
        if start <= float(e["mono"]) <= end  # type: ignore[arg-type]
    }
    failed = {str(e["key"]) for e in select(events, "submit", "fail")}
    return len(sent & failed) / len(sent) if sent else None
