"""Which models stay loaded: eviction by plan, demand and recency (pure), and an agent's
``Models`` never holding more than its GPU memory, waiting for a run rather than evicting
a model in use."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core.residency import Demand, Resident, evictions
from mesh.pipelines import Models, ModelsFull


def test_a_model_that_fits_evicts_nothing() -> None:
    assert evictions({"a": Resident(4000, 1.0)}, 4000, 8000) == []


def test_unplanned_then_least_demanded_then_least_recent_go_first() -> None:
    loaded = {
        "planned": Resident(2000, 1.0, demand=0.0, planned=True),
        "hot": Resident(2000, 2.0, demand=5.0),
        "old": Resident(2000, 3.0, demand=0.1),
        "older": Resident(2000, 1.0, demand=0.1),
    }
    assert evictions(loaded, 2000, 8000) == ["older"]
    assert evictions(loaded, 6000, 8000) == ["older", "old", "hot"]
    assert evictions(loaded, 8000, 8000) == ["older", "old", "hot", "planned"]


def test_a_model_in_use_is_never_evicted() -> None:
    loaded = {"busy": Resident(6000, 0.0, in_use=1), "idle": Resident(2000, 9.0)}
    assert evictions(loaded, 4000, 8000) is None  # only the busy one would make room
    assert evictions(loaded, 2000, 8000) == ["idle"]


residents = st.dictionaries(
    st.text("abcdef", min_size=1, max_size=3),
    st.builds(
        Resident,
        st.integers(0, 8000),
        st.floats(0, 100),
        st.floats(0, 10),
        st.booleans(),
        st.integers(0, 2),
    ),
    max_size=8,
)


@given(residents, st.integers(0, 20_000), st.integers(1, 40_000))
def test_evicting_makes_room_and_never_touches_a_model_in_use(
    loaded: dict[str, Resident], need: int, capacity: int
) -> None:
    chosen = evictions(loaded, need, capacity)
    if chosen is None:
        idle = sum(r.memory_mb for r in loaded.values() if not r.in_use)
        used = sum(r.memory_mb for r in loaded.values())
        assert capacity - used + idle < need
        return
    assert all(loaded[n].in_use == 0 for n in chosen)
    left = sum(r.memory_mb for n, r in loaded.items() if n not in chosen)
    assert left + need <= capacity
    assert len(set(chosen)) == len(chosen)


def test_demand_is_a_rate_that_decays() -> None:
    demand = Demand(half_life_s=60)
    for second in range(600):
        demand.arrived("m", float(second))  # one a second for ten minutes
    assert demand.rate("m", 600.0) == pytest.approx(1.0, rel=0.02)
    assert demand.rate("m", 660.0) == pytest.approx(0.5, rel=0.02)
    assert "m" not in demand.rates(600.0 + 60 * 20)  # forgotten once cold


async def test_models_fill_the_memory_evict_the_least_useful_and_wait_for_a_run() -> None:
    now = [0.0]
    evicted: list[str] = []
    models = Models([], lambda: None, capacity_mb=10_000, clock=lambda: now[0],
                    on_evicted=evicted.append)  # fmt: skip
    loads: list[str] = []

    def load(name: str) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            loads.append(name)

        return go

    async with models.using("a", load("a"), 6000) as cold:
        assert cold
    now[0] = 1.0
    async with models.using("b", load("b"), 4000):
        pass
    models.demand.arrived("a", now[0])  # a is wanted again: b goes first
    now[0] = 2.0
    async with models.using("c", load("c"), 4000):
        assert models.loaded == {"a", "c"} and evicted == ["b"]
        assert models.used_mb == 10_000
        # "d" needs a's room and c's, and c is in use: it waits for this run to end
        waiting = asyncio.create_task(models.ensure("d", load("d"), 9000))
        await asyncio.sleep(0)
        assert not waiting.done()
    await asyncio.wait_for(waiting, 5)  # a hang guard
    assert models.loaded == {"d"} and models.used_mb == 9000
    with pytest.raises(ModelsFull, match="needs 20000 MB"):
        await models.ensure("huge", load("huge"), 20_000)
    assert loads == ["a", "b", "c", "d"]
