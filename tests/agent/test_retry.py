"""Retry policies, on virtual time (``sim.loop``): a patient one lasts its whole span
whatever its jitter draws, so a run's end outlives an etcd outage it was sized for. The
simulator found this one: with the shortest jitter, the tries of ``patient(15)`` added up
to under 8 s, the end of a task was dropped, and its record said RUNNING for ever."""

from __future__ import annotations

import asyncio
import random

import pytest

from mesh.agent.retry import RetryPolicy, patient
from mesh.errors import InvalidTask, Unavailable
from sim.loop import run


class Shortest(random.Random):
    def random(self) -> float:
        return 0.0  # every delay at half its length


def test_a_patient_policy_outlasts_its_span_whatever_the_jitter() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()

        async def attempt() -> float:
            if loop.time() < 14.9:
                raise Unavailable("etcd: no leader")
            return loop.time()

        policy = patient(15.0)
        short = RetryPolicy(policy.delays_s, policy.retryable, policy.final, Shortest(), 15.0)
        return await short.run(attempt)

    assert 14.9 <= run(main()) <= 17.0


def test_an_error_not_worth_retrying_ends_it_at_once() -> None:
    async def main() -> None:
        async def attempt() -> None:
            raise InvalidTask("bad")

        await patient(15.0).run(attempt)

    with pytest.raises(InvalidTask):
        run(main())


def test_past_its_span_the_last_failure_is_the_callers() -> None:
    async def main() -> float:
        async def attempt() -> None:
            raise Unavailable("still down")

        try:
            await patient(5.0).run(attempt)
        except Unavailable:
            return asyncio.get_running_loop().time()
        raise AssertionError("it never gave up")

    assert 5.0 <= run(main()) <= 8.0
