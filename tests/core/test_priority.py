"""Priority policies, pure: fair shares under saturation, learned run times, and a wait
bound that holds under every policy (simulated GPUs, explicit clock)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core.priority import (
    POLICIES,
    Estimates,
    FairShare,
    Policy,
    ShortestFirst,
    Traits,
    make,
    wait_bound,
)
from mesh.core.queue import LaneQueue


def lane(tenant: str, kind: str = "sleep/m", gpus: int = 1) -> Traits:
    return Traits("normal", tenant, kind, gpus)


# -- fair share ---------------------------------------------------------------------------

shares = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 8), min_size=2, max_size=4
)


@given(shares, st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 4)))
def test_under_saturation_each_tenant_gets_its_share_of_gpu_time(
    weight: dict[str, int], gpus: dict[str, int]
) -> None:
    """Every tenant always has work waiting; each task's size differs by tenant. Over a
    long run, each tenant's GPU-seconds are its share's part, within 5%."""
    policy = FairShare({t: float(w) for t, w in weight.items()}, aging_s=1e9)
    heads = {lane(t, gpus=gpus.get(t, 1)): 0.0 for t in weight}
    served: Counter[str] = Counter()
    for _ in range(400 * len(weight)):
        chosen = policy.choose(heads, now=1.0)
        assert chosen is not None
        served[chosen.tenant] += chosen.gpus
    total, weights = sum(served.values()), sum(weight.values())
    for tenant, w in weight.items():
        assert abs(served[tenant] / total - w / weights) <= 0.05, (served, weight)


def test_a_tenant_back_from_idling_gets_its_share_not_a_burst() -> None:
    policy = FairShare({"a": 1.0, "b": 1.0}, aging_s=1e9)
    for _ in range(100):
        policy.choose({lane("a"): 0.0}, now=1.0)  # b idles
    both = {lane("a"): 0.0, lane("b"): 0.0}
    first = Counter(c.tenant for c in (policy.choose(both, now=1.0) for _ in range(20)) if c)
    assert first == {"a": 10, "b": 10}


def test_a_refused_head_costs_its_tenant_nothing() -> None:
    policy, twin = FairShare({}, 1e9), FairShare({}, 1e9)
    heads = {lane("a"): 0.0, lane("b"): 0.0}
    state = policy.snapshot()
    policy.choose(heads, now=1.0)
    policy.restore(state)
    assert [policy.choose(heads, 1.0) for _ in range(6)] == [
        twin.choose(heads, 1.0) for _ in range(6)
    ]


# -- shortest expected first --------------------------------------------------------------


def test_run_times_are_learned_per_kind_and_shortest_goes_first() -> None:
    estimates = Estimates(alpha=0.5, default_s=1.0)
    policy = ShortestFirst(aging_s=1e9, estimates=estimates)
    slow, fast = lane("a", "llm/big"), lane("b", "tts/small")
    assert policy.choose({slow: 0.0, fast: 1.0}, now=2.0) == slow  # unknown: equal, older first
    estimates.learn("llm/big", 30.0)
    estimates.learn("tts/small", 0.5)
    estimates.learn("tts/small", float("nan"))  # ignored
    assert estimates.expected("tts/small") == 0.5
    assert policy.choose({slow: 0.0, fast: 1.0}, now=2.0) == fast
    assert estimates.cost(lane("a", "llm/big", gpus=2)) == 60.0


def test_policies_are_named_and_an_unknown_name_is_refused() -> None:
    for name in POLICIES:
        assert make(name, {"normal": 1}, {}, 30.0).name == name
    with pytest.raises(ValueError, match="unknown priority policy 'lottery'"):
        make("lottery", {"normal": 1}, {}, 30.0)


# -- the wait bound, under every policy ---------------------------------------------------


@dataclass(frozen=True, order=True)
class Task:
    enqueued: int
    serial: int
    tenant: str
    kind: str
    duration: int


DURATIONS = {"short": 1, "medium": 3, "long": 7}
arrivals = st.lists(
    st.tuples(
        st.integers(0, 30),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(sorted(DURATIONS)),
        st.integers(1, 6),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(POLICIES), arrivals, st.integers(1, 3), st.integers(1, 20))
def test_no_task_waits_past_the_bound_of_its_policy(
    name: str, arriving: list[tuple[int, str, str, int]], slots: int, aging_s: int
) -> None:
    """A simulated agent with ``slots`` GPUs, tasks of three lengths from three tenants.
    Each task starts within ``wait_bound``: its aging time, the longest run, and the work
    queued before it spread over the slots (one tick of slack for the tick clock)."""
    estimates = Estimates()
    policy: Policy = make(name, {"normal": 1}, {"a": 3.0, "b": 1.0}, aging_s, estimates)
    q: LaneQueue[Task] = LaneQueue(
        policy, lambda t: Traits("normal", t.tenant, t.kind), ["normal"], 10_000
    )
    schedule = deque(
        sorted(
            (at, i, tenant, kind, DURATIONS[kind])
            for i, (at, tenant, kind, n) in enumerate(arriving)
            for _ in range(n)
        )
    )
    waiting: set[Task] = set()
    bound: dict[Task, float] = {}
    running: list[tuple[int, Task]] = []  # (ends at, task)
    serial, tick = 0, 0
    while schedule or waiting or running:
        for ends, task in [r for r in running if r[0] <= tick]:
            running.remove((ends, task))
            estimates.learn(task.kind, task.duration)
        while schedule and schedule[0][0] <= tick:
            at, _, tenant, kind, duration = schedule.popleft()
            task = Task(at, serial, tenant, kind, duration)
            serial += 1
            q.push(task, now=float(at))
            waiting.add(task)
        for task in waiting - bound.keys():  # arrived now: all that waits is no younger
            earlier = sum(t.duration for t in waiting) - task.duration
            bound[task] = wait_bound(aging_s, earlier, slots, max(DURATIONS.values())) + 1
        while len(running) < slots and (task := q.pop(now=float(tick))) is not None:
            waiting.discard(task)
            assert tick - task.enqueued <= bound[task], (name, task, tick, bound[task])
            running.append((tick + task.duration, task))
        tick += 1
        assert tick < 100_000


@pytest.mark.parametrize("name", POLICIES)
def test_online_work_goes_before_batch_under_every_policy(name: str) -> None:
    policy = make(name, {"normal": 1}, {"a": 100.0, "b": 1.0}, aging_s=60)
    batch = Traits("normal", "a", "sleep/m", 1, "batch")
    online = Traits("normal", "b", "llm/big", 4, "online")
    assert policy.choose({batch: 0.0, online: 5.0}, now=6.0) == online
    assert policy.choose({batch: 0.0, online: 5.0}, now=60.0) == batch  # aged: oldest first
