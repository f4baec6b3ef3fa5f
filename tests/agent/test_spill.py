"""The overflow cap and the decision log, both pure enough to check without processes."""

from __future__ import annotations

from pathlib import Path

from mesh.agent.decisionlog import DecisionLog, replay
from mesh.core.router import Router
from mesh.core.routing import Member, Overflow, Policy, Request, Spill
from mesh.core.spill import SpillShare


def test_spill_share_caps_what_leaves_the_dc() -> None:
    share = SpillShare(max_share=0.25, window=8)
    sent = 0
    for _ in range(8):
        if share.allowed():
            share.record(True)
            sent += 1
    assert sent == 2  # a quarter of the window, even before any local placement
    for _ in range(8):
        share.record(False)  # the window slides: the old spills age out
    assert share.share == 0 and share.allowed()


def test_no_share_means_no_spill() -> None:
    assert not SpillShare(max_share=0.0).allowed()


def test_decision_log_replays_identically_and_catches_a_changed_router(tmp_path: Path) -> None:
    router = Router(Policy(load_factor=1.25))
    router.set_members(
        Member(f"a{i}", 0.6 + i / 10, (81920,) * (1 + i % 3), frozenset({"sleep"}))
        for i in range(6)
    )
    log = DecisionLog(tmp_path / "d.jsonl")
    spill = Spill(to=(Overflow("east", 2.0),))
    for i in range(40):
        request = Request(f"t{i}", f"m{i % 5}", "sleep")
        decision = router.route(request, visited=["a1"] if i % 7 == 0 else (), spill=spill)
        log.write(router, request, ["a1"] if i % 7 == 0 else [], spill, decision)
        router.set_load(decision.first.name, i % 4, i % 3)
        router.set_loaded(decision.first.name, [f"m{i % 5}"])
    log.close()
    results = list(replay(tmp_path / "d.jsonl"))
    assert len(results) == 40 and all(r.same for r in results)

    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    tampered = lines[3].replace('"load_factor":1.25', '"load_factor":3.0')
    (tmp_path / "d.jsonl").write_text(tampered + "\n")
    assert not next(iter(replay(tmp_path / "d.jsonl"))).same
