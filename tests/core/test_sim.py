"""The simulator, at CI's size: the whole mesh in one process on virtual time. A seed
replays byte for byte; the regression seeds and a fixed set of others hold every
invariant of the chaos suite's checker. ``python -m sim run --seeds 1000`` is the full
size."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from sim.faults import Fault
from sim.regressions import REGRESSIONS
from sim.run import simulate

CI_SEEDS = range(201, 213)  # sized to a few seconds; not the seeds the bugs came from


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    logging.disable(logging.WARNING)  # hundreds of agents' warnings about the faults
    yield
    logging.disable(logging.NOTSET)


def test_the_same_seed_gives_the_same_history_byte_for_byte() -> None:
    first, second = simulate(9, tasks=60), simulate(9, tasks=60)
    assert first.history_sha256 == second.history_sha256
    assert first.faults and first.events == second.events
    assert simulate(10, tasks=60).history_sha256 != first.history_sha256


@pytest.mark.parametrize("regression", REGRESSIONS, ids=lambda r: f"seed{r.seed}")
def test_a_regression_seed_holds(regression) -> None:
    outcome = simulate(regression.seed, regression.tasks, schedule=list(regression.schedule))
    assert outcome.ok, outcome.verdict.violations
    assert outcome.verdict.accepted >= 0.9 * regression.tasks  # its load ran: few gave up


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_a_seed_holds_every_invariant(seed: int) -> None:
    outcome = simulate(seed, tasks=100)
    assert outcome.ok, (outcome.faults, outcome.verdict.violations)
    assert outcome.verdict.accepted > 90


def test_the_simulator_finds_an_impatient_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharpness: with the retry budget counted in tries again (broken here, in the test
    tree, not in the product), the regression's schedule strands tasks RUNNING."""
    from mesh.agent import reporting, retry

    def impatient(total_s: float, step_s: float = 2.0, final: tuple = ()) -> retry.RetryPolicy:
        return retry.RetryPolicy(delays_s=(0.1, 0.3, 1.0, 2.0, step_s), final=final)

    monkeypatch.setattr(reporting, "patient", impatient)
    regression = REGRESSIONS[0]
    outcome = simulate(regression.seed, regression.tasks, schedule=list(regression.schedule))
    assert any("is still RUNNING" in v for v in outcome.verdict.violations)


def test_the_simulator_finds_a_move_that_loses_the_tasks_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sharpness: offers that no longer carry a moved task's wait (broken here) queue it
    on the idle agent as a newcomer; seed 2 moves such a task."""
    from mesh.agent import placement

    offered = placement.offered

    def forgetful(job: object, me: str, max_tasks: float) -> object:
        envelope = offered(job, me, max_tasks)  # type: ignore[arg-type]
        envelope.waited_s = 0.0
        return envelope

    monkeypatch.setattr(placement, "offered", forgetful)
    outcome = simulate(2, tasks=100)
    assert any(v.startswith("moved without its place") for v in outcome.verdict.violations)


def test_the_simulator_finds_a_submit_that_leaves_its_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sharpness: a refused Submit that no longer settles the record it could not take
    back (broken here) leaves a task PENDING for ever under the second regression's
    schedule."""
    from mesh.agent.submission import Submission

    def forget(self: Submission, admitted: object) -> None:
        return None

    monkeypatch.setattr(Submission, "_settle_soon", forget)
    regression = REGRESSIONS[1]
    found = []
    for seed in (regression.seed, 4):  # the interleaving moves with the code; one finds it
        outcome = simulate(seed, regression.tasks, schedule=list(regression.schedule))
        found += [v for v in outcome.verdict.violations if "is still PENDING" in v]
        if found:
            break
    assert found


def test_the_simulator_finds_an_unfenced_slot_delete(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharpness: quota slots given back by name, not fenced by the lease that took
    them (broken here): an agent paused past its lease wakes, frees slots that other
    runs took since, and the DC holds more GPUs than the group's cap."""
    from mesh.agent.runquota import RunQuota
    from mesh.store import kv
    from mesh.store.quota import QuotaStore

    def unfenced(self: QuotaStore, names: list[bytes], lease: int) -> list[kv.Op]:
        return [kv.Delete(key) for key in names]

    def any_lease(self: RunQuota, slots) -> list:
        return self._quota.give_back(slots.names, slots.lease) if slots.names else []

    monkeypatch.setattr(QuotaStore, "give_back", unfenced)
    monkeypatch.setattr(RunQuota, "freeing", any_lease)
    found = []
    for seed, target in ((5, "west-1"), (3, "east-2")):  # either finds it; both, today
        outcome = simulate(seed, 100, schedule=[Fault(2.0, "pause", target, 9.0)])
        found += [v for v in outcome.verdict.violations if v.startswith("cap exceeded")]
        if found:
            break
    assert found


def test_the_simulator_finds_an_owner_that_dies_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharpness: a queue owner whose duties end (one is cancelled unasked, and takes
    the others with it, as a 3.11 TaskGroup does) but which keeps its election (broken
    here): nobody dispatches the DC's backlog, and its tasks wait for ever."""
    import asyncio

    from mesh.agent.owner import QueueOwner

    async def silent(self: QueueOwner, term: int) -> None:
        duties = [
            asyncio.create_task(self._recover_orphans(), name="owner orphans"),
            asyncio.create_task(self.dispatcher.run(), name="owner dispatch"),
            asyncio.create_task(self._reconcile(), name="owner reconcile"),
            asyncio.create_task(self._watchdog(), name="owner watchdog"),
        ]
        await asyncio.wait(duties, return_when=asyncio.FIRST_COMPLETED)
        for task in duties:
            task.cancel()
        await asyncio.Event().wait()  # the term goes on, with nothing behind it

    monkeypatch.setattr(QueueOwner, "_lead", silent)
    schedule = [Fault(2.0, "owner-duty", "west", 1.0), Fault(3.0, "pause", "west-2", 8.0)]
    outcome = simulate(1, 100, schedule=schedule)
    assert any("is still QUEUED" in v for v in outcome.verdict.violations)
