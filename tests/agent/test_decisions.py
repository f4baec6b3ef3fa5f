"""Routing, quota, preemption and plan decisions in the decision log, replayed offline by
the pure core: the same inputs decide the same, and a line whose decision was not the
core's is found."""

from __future__ import annotations

import json
from pathlib import Path

from mesh.agent.decisionlog import DecisionLog, replay
from mesh.core.classes import BATCH
from mesh.core.planner import Host, plan
from mesh.core.preemption import Run, victims
from mesh.core.router import Router
from mesh.core.routing import NO_SPILL, Member, Policy, Request
from mesh.core.tenants import Cap, Judged, Spend, verdict


def test_quota_and_preemption_decisions_replay_to_the_same_and_a_forged_one_differs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    caps = [Cap("user", "ada", 2), Cap("group", "vision", 4)]
    held = {("user", "ada"): 2, ("group", "vision"): 3}
    log.quota("q-1", 1, Judged(caps, held, [], {}, 0.0, verdict(caps, held, 1, [], {}, 0.0)))
    roomy = {("user", "ada"): 1, ("group", "vision"): 3}
    budgets = [Spend("group", "vision", 100.0, 3600)]
    used, now_s = {("group", "vision"): 100.5}, 7200.0 + 600
    wait = verdict(caps, roomy, 1, budgets, used, now_s)
    log.quota("q-2", 1, Judged(caps, roomy, budgets, used, now_s, wait))
    runs = [Run("b-1", BATCH, "t", 1, 1.0), Run("b-2", BATCH, "t", 1, 2.0)]
    log.preempt("o-1", runs, 0, 1, 2, 0.5, {}, victims(runs, 0, 1, 2, 0.5))
    log.close()
    replayed = list(replay(path))
    assert [(r.task_id, r.same) for r in replayed] == [("q-1", True), ("q-2", True), ("o-1", True)]
    assert replayed[0].now == {"wait": "waiting for quota: user ada at 2/2 GPUs"}
    assert replayed[1].now == {
        "wait": "waiting for budget: group vision spent 100.5/100 GPU-seconds this period "
        "(renewed in 3000s)"
    }
    assert replayed[2].now == {"victims": ["b-2"]}  # the newest batch run

    lines = path.read_text().splitlines()
    forged = json.loads(lines[2])
    forged["decision"]["victims"] = ["b-1"]
    path.write_text("\n".join([*lines[:2], json.dumps(forged)]) + "\n")
    assert [r.same for r in replay(path)] == [True, True, False]


def test_a_placement_plan_replays_to_the_same_homes(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    hosts = [Host("a", 1.0, 80, frozenset({"hot"})), Host("b", 0.5, 80), Host("c", 1.0, 40)]
    demand = {"hot": 2.0, "warm": 0.5, "cold": 0.01}
    sizes = {"hot": 60, "warm": 40, "cold": 40}  # GB: hot fits c's 40 GB only in units
    first = plan(demand, hosts, sizes=sizes)
    log.plan(demand, hosts, None, first, sizes)
    again = {"hot": 0.1, "warm": 2.0}
    log.plan(again, hosts, first, plan(again, hosts, first, sizes), sizes)
    log.close()
    replayed = list(replay(path))
    assert [r.same for r in replayed] == [True, True]
    assert replayed[0].now["homes"]["hot"][0] == "a"  # it stays where it is loaded
    unsized = {m: list(a) for m, a in plan(demand, hosts).homes.items()}
    assert replayed[0].now["homes"] != unsized  # the sizes logged made a difference


def test_a_route_that_followed_the_plan_replays_to_the_same_agent(tmp_path: Path) -> None:
    router = Router(Policy(home_slack=1.0))
    router.set_members(
        Member(f"a{i}", 1.0, (80 * 1024,), frozenset({"sleep"}), queue_limit=10) for i in range(6)
    )
    router.set_homes({"m": ("a4",)})
    request = Request("t-1", "m", "sleep")
    decision = router.route(request)
    assert decision.first.name == "a4"
    assert decision.first.reason.startswith("plan:")
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path)
    log.write(router, request, (), NO_SPILL, decision)
    log.close()
    (replayed,) = replay(path)
    assert replayed.same, replayed.now  # the homes are part of the logged view
