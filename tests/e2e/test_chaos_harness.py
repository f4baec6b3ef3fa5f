"""The chaos harness itself: a scenario that breaks is reported and leaves nothing behind,
and one the machine cannot stage is reported as not run, never as passed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from chaos import run as chaos_run
from chaos.__main__ import app, seed_list
from chaos.scenarios import Context, Scenario, Staged, measured


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it exited while we looked
        if text in argv:
            found.append(argv)
    return found


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


async def test_a_scenario_that_breaks_is_failed_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    async def boom(ctx: Context, staged: Staged) -> None:
        staged.start = ctx.mark("boom")
        raise RuntimeError("the fault could not be staged")

    outcome = await chaos_run.run_scenario(
        Scenario("boom", "a stage that raises", boom, measured), tmp_path / "boom", seed=1
    )
    assert outcome.status == "failed"
    assert "the fault could not be staged" in outcome.reason
    # It got as far as a whole mesh: etcd members and agents wrote their logs.
    assert (tmp_path / "boom" / "logs" / "west-1.log").exists()
    assert processes_mentioning(str(tmp_path)) == []
    assert "-wan" not in namespaces() and "-west" not in namespaces()


def test_a_scenario_the_machine_cannot_stage_is_not_run_and_never_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        chaos_run,
        "unmet_needs",
        lambda: {"netns": "network namespaces need root", "etcd-3.4": None},
    )
    args = ["run", "--scenario", "dc-partition", "--workdir", str(tmp_path), "--json"]
    lenient = CliRunner().invoke(app, args)
    assert lenient.exit_code == 0, lenient.output
    assert '"status": "not run"' in lenient.output
    assert "network namespaces need root" in lenient.output
    assert CliRunner().invoke(app, [*args, "--strict"]).exit_code == 1


def test_seeds_read_as_ranges_and_lists_each_once() -> None:
    assert seed_list("1-5,7") == [1, 2, 3, 4, 5, 7]
    assert seed_list("7, 3-4, 4") == [7, 3, 4]
    for bad in ("", "1-", "a", "5-1", "-3"):
        with pytest.raises(typer.BadParameter):
            seed_list(bad)
