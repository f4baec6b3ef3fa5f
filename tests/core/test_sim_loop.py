"""The simulator's event loop: virtual time that jumps to the next timer, the same order
every run, and a stuck simulation named instead of hung."""

from __future__ import annotations

import asyncio

import pytest

from sim.kv import SimKv
from sim.loop import Stuck, VirtualLoop, run


def test_an_hour_of_timers_takes_no_wall_time_and_keeps_its_order() -> None:
    async def main() -> list[tuple[float, str]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[float, str]] = []

        async def after(delay: float, name: str) -> None:
            await asyncio.sleep(delay)
            seen.append((loop.time(), name))

        await asyncio.gather(after(3600, "hour"), after(0.5, "half"), after(60, "minute"))
        return seen

    assert run(main()) == [(0.5, "half"), (60.0, "minute"), (3600.0, "hour")]


def test_a_simulation_that_can_never_move_again_is_stuck() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    with pytest.raises(Stuck):
        run(forever())


def test_the_same_program_runs_the_same_way_twice() -> None:
    def trace() -> list[str]:
        async def main() -> list[str]:
            events: list[str] = []

            async def worker(name: str, pauses: list[float]) -> None:
                for pause in pauses:
                    await asyncio.sleep(pause)
                    events.append(f"{name}@{asyncio.get_running_loop().time():.3f}")

            await asyncio.gather(worker("a", [0.1, 0.2, 0.3]), worker("b", [0.15, 0.15, 0.3]))
            return events

        return run(main())

    assert trace() == trace()


def test_a_lease_expires_in_virtual_time() -> None:
    async def main() -> tuple[bool, float]:
        store = SimKv()
        lease = await store.grant(5)
        await store.put(b"/k", b"v", lease)
        await asyncio.sleep(4.9)
        alive = await store.get(b"/k") is not None
        await asyncio.sleep(0.2)
        return alive and await store.get(b"/k") is None, asyncio.get_running_loop().time()

    gone, now = run(main())
    assert gone and now == pytest.approx(5.1)


def test_the_loop_is_a_loop() -> None:
    loop = VirtualLoop()
    try:
        assert loop.time() == 0.0
        assert loop.run_until_complete(asyncio.sleep(10, "done")) == "done"
        assert loop.time() == pytest.approx(10.0)
    finally:
        loop.close()
