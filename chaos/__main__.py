"""``python -m chaos``: run the failover scenarios and print what they proved."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from chaos.run import Outcome, run_scenario, unmet_needs
from chaos.scenarios import BY_NAME, SCENARIOS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def seed_list(text: str) -> list[int]:
    """``1-5``, ``7`` or ``1-5,7``: the seeds, in the order given, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise typer.BadParameter(f"{part!r} is not a seed or a range like 1-5")
        span = range(int(low), int(high if dash else low) + 1)
        if not span:
            raise typer.BadParameter(f"{part!r} is an empty range")
        seeds += [n for n in span if n not in seeds]
    return seeds


def _table(outcomes: list[Outcome]) -> Table:
    table = Table(title=f"chaos suite (lease TTL {outcomes[0].ttl_s} s)" if outcomes else "")
    for column in (
        "seed", "scenario", "result", "submitted", "succeeded", "failed", "rejected", "lost",
        "dup", "detect s", "recover s", "failover s", "client errors",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column in ("scenario", "result") else "right")
    for o in outcomes:
        colour = {"passed": "green", "failed": "red"}.get(o.status, "yellow")
        table.add_row(
            str(o.seed),
            o.scenario,
            f"[{colour}]{o.status}[/{colour}]",
            *(str(n) for n in (o.submitted, o.succeeded, o.failed, o.rejected, o.lost)),
            str(o.duplicates),
            _seconds(o.detect_s),
            _seconds(o.recover_s),
            _seconds(o.failover_s),
            "-" if o.error_rate is None else f"{o.error_rate:.0%}",
        )
    return table


@app.command("list")
def list_scenarios() -> None:
    """The scenarios, which are in the quick set, and what this machine cannot stage."""
    unmet = unmet_needs()
    for s in SCENARIOS:
        why = "; ".join(unmet[n] or "" for n in s.needs if unmet.get(n))
        print(
            f"{s.name:18} {'quick' if s.quick else '     '}  {s.summary}"
            + (f"  [not here: {why}]" if why else "")
        )


@app.command()
def run(
    scenario: Annotated[list[str] | None, typer.Option(help="Run only these (repeatable).")] = None,
    quick: Annotated[bool, typer.Option(help="Only the quick set (what CI runs).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per scenario.")] = False,
    strict: Annotated[
        bool, typer.Option(help="A missed target or a scenario not run fails the suite too.")
    ] = False,
    workdir: Annotated[Path | None, typer.Option(help="Keep logs and histories here.")] = None,
    seed: int = 1,
    seeds: Annotated[
        str | None,
        typer.Option(help="Run the suite once per seed, in a row: '1-5', '7' or '1-5,7'."),
    ] = None,
) -> None:
    """Stage each fault against a fresh mesh and check the invariants afterwards."""
    unknown = [n for n in scenario or [] if n not in BY_NAME]
    if unknown:
        raise typer.BadParameter(f"unknown scenario(s) {unknown}; see 'python -m chaos list'")
    chosen = (
        [BY_NAME[n] for n in scenario]
        if scenario
        else [s for s in SCENARIOS if s.quick or not quick]
    )
    base = workdir or Path(tempfile.mkdtemp(prefix="gpumesh-chaos-"))
    console = Console(stderr=as_json, width=None if Console().is_terminal else 150)
    runs = [(n, s) for n in (seed_list(seeds) if seeds else [seed]) for s in chosen]
    outcomes = []
    for n, s in runs:
        console.print(f"[bold]{s.name}[/bold] (seed {n}): {s.summary}")
        folder = base / s.name if seeds is None else base / f"seed-{n}" / s.name
        outcome = asyncio.run(run_scenario(s, folder, n, quick))
        outcomes.append(outcome)
        if as_json:
            print(json.dumps(outcome.as_json()), flush=True)
        for line in outcome.violations + outcome.missed:
            console.print(f"  [red]{line}[/red]")
        if outcome.reason:
            console.print(f"  [yellow]{outcome.reason}[/yellow]")
        for line in outcome.notes:
            console.print(f"  {line}")
    console.print(_table(outcomes))
    console.print(f"logs and histories: {base}")
    bad = [o for o in outcomes if o.status == "failed" or (strict and o.status != "passed")]
    raise typer.Exit(1 if bad else 0)


if __name__ == "__main__":
    app()
