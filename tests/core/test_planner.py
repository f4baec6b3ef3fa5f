"""The placement planner and the router's use of it, pure: every model with demand has a
home before any has two, while there is room; no agent is given more models than it
holds; hot models get weight in proportion to their demand; an unchanged view gives an
unchanged plan; a plan is made again when demand drifts or a new model has no home; and
the router sends a model's tasks to its least loaded home with room, one holding the
model first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.core.planner import Host, candidates, drifted, homeless, keeping, plan
from mesh.core.router import Router
from mesh.core.routing import AGENT, Member, Policy, Request

hosts = st.lists(
    st.builds(Host, st.uuids().map(lambda u: u.hex[:8]), st.floats(0.5, 8), st.integers(1, 4)),
    min_size=1,
    max_size=12,
    unique_by=lambda h: h.name,
)
demands = st.dictionaries(
    st.sampled_from([f"m{i}" for i in range(15)]), st.floats(0.0, 20.0), max_size=15
)


@given(demands, hosts)
def test_room_is_respected_and_demand_finds_homes(demand: dict, fleet: list[Host]) -> None:
    made = plan(demand, fleet)
    room = {h.name: h.room for h in fleet}
    for name, models in made.hosting.items():
        assert len(models) <= room[name]
    wanted = sorted((m for m, v in demand.items() if v > 0), key=lambda m: (-demand[m], m))
    # every model with demand has a home before any has a second: the hottest as many as
    # the agents have room for, whatever the other models' demand
    covered = wanted[: sum(room.values())]
    assert all(made.homes.get(m) for m in covered), made.homes
    assert plan(demand, fleet) == made  # deterministic


@given(
    demands,
    st.lists(
        st.builds(
            Host, st.uuids().map(lambda u: u.hex[:8]), st.floats(0.5, 8), st.integers(0, 160)
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda h: h.name,
    ),
    st.dictionaries(st.sampled_from([f"m{i}" for i in range(15)]), st.integers(1, 80)),
)
def test_models_of_any_size_fit_their_homes_and_a_plan_calls_for_no_other(
    demand: dict, fleet: list[Host], sizes: dict
) -> None:
    """With models of different sizes (GB here; agents use MB), no agent is planned past
    its memory, and the plan leaves no model homeless that some agent still has room for:
    a plan is never made again for its own sake."""
    made = plan(demand, fleet, sizes=sizes)
    room = {h.name: h.room for h in fleet}
    for name, models in made.hosting.items():
        assert sum(sizes.get(m, 1) for m in models) <= room[name], (name, models)
    assert not homeless(made, demand, fleet, sizes)


def test_a_big_model_takes_the_room_of_several() -> None:
    fleet = [Host("a", 1.0, 80), Host("b", 1.0, 80)]  # GB of GPU memory each
    sizes = {"big": 60, "s1": 20, "s2": 20, "s3": 20, "s4": 20, "s5": 20, "huge": 40}
    demand = {"big": 4.0, "s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0}
    made = plan(demand, fleet, sizes=sizes)
    assert made.hosting == {"a": {"big"}, "b": {"s1", "s2", "s3", "s4"}}
    assert homeless(made, {**demand, "s5": 0.1}, fleet, sizes)  # 20 GB left on a: plan again
    assert not homeless(made, {**demand, "huge": 0.1}, fleet, sizes)  # no agent has 40 GB


@given(demands, hosts)
def test_an_unchanged_view_gives_an_unchanged_plan(demand: dict, fleet: list[Host]) -> None:
    first = plan(demand, fleet)
    loaded = [Host(h.name, h.weight, h.room, first.for_agent(h.name)) for h in fleet]
    assert plan(demand, loaded, first) == plan(demand, loaded, first)
    again = plan(demand, loaded, first)
    assert again.hosting == first.hosting  # nothing moves: no load paid for nothing


def test_a_hot_model_gets_weight_in_proportion_to_its_demand() -> None:
    fleet = [Host(f"a{i}", 4.0, 2) for i in range(10)]  # 40 units of weight, 20 model places
    made = plan({"hot": 6.0, "warm": 3.0, "cold": 1.0}, fleet, headroom=1.0)
    weight = {m: 4.0 * len(names) for m, names in made.homes.items()}
    assert weight["hot"] >= 24 and weight["warm"] >= 12 and weight["cold"] >= 4
    assert len(made.homes["hot"]) > len(made.homes["warm"]) > len(made.homes["cold"]) - 1


def member(name: str, weight: float = 1.0) -> Member:
    return Member(name, weight, (80 * 1024,), frozenset({"sleep"}), queue_limit=100)


def test_the_router_sends_a_task_to_its_least_loaded_home_with_room() -> None:
    router = Router(Policy(home_slack=1.0))
    router.set_members([member(f"a{i}") for i in range(6)])
    router.set_homes({"m": ("a3", "a4")})
    router.set_load("a3", 1, 0)
    assert (
        router.route(Request("t1", "m", "sleep")).first
        == router.route(Request("t2", "m", "sleep")).first
    )
    first = router.route(Request("t1", "m", "sleep")).first
    assert (first.kind, first.name) == (AGENT, "a4")  # a3 is busier
    router.set_load("a4", 1, 0)
    router.set_load("a3", 3, 0)  # past bound + slack: a4 it is
    assert router.route(Request("t3", "m", "sleep")).first.name == "a4"
    router.set_load("a4", 3, 0)  # both homes full: the ring decides, elsewhere
    assert router.route(Request("t4", "m", "sleep")).first.name not in {"a3", "a4"}


def test_a_plan_is_made_again_only_when_demand_drifts() -> None:
    before = {"hot": 6.0, "warm": 3.0, "cold": 1.0}
    assert not drifted(before, {"hot": 6.2, "warm": 2.9, "cold": 1.0})  # noise
    assert not drifted(before, {"hot": 12.0, "warm": 6.0, "cold": 2.0})  # more, same shares
    assert drifted(before, {"hot": 3.0, "warm": 6.0, "cold": 1.0})  # the shares moved
    assert drifted(before, {**before, "new": 2.0})  # a model came, with a real share
    assert not drifted(before, {**before, "stray": 0.1})  # or with a sliver of it
    assert drifted({}, before) and not drifted({}, {})


def test_a_home_still_to_load_the_model_comes_after_an_agent_that_holds_it() -> None:
    router = Router(Policy(home_slack=1.0))
    router.set_members([member(f"a{i}") for i in range(6)])
    router.set_homes({"m": ("a3", "a4")})
    router.set_loaded("a1", {"m"})  # a stray copy: the plan has not been warmed yet
    targets = router.route(Request("t1", "m", "sleep")).targets
    assert [t.name for t in targets[:3]] == ["a1", "a3", "a4"]
    assert targets[1].reason.startswith("plan:") and "not loaded" in targets[1].reason
    router.set_loaded("a4", {"m"})  # warmed: the home that holds it first
    assert [t.name for t in router.route(Request("t1", "m", "sleep")).targets[:3]] == [
        "a4",
        "a1",
        "a3",
    ]


def test_a_new_model_without_a_home_calls_for_a_plan_while_there_is_room() -> None:
    fleet = [Host("a", 1.0, 2), Host("b", 1.0, 2)]
    before = {"hot": 6.0, "warm": 3.0}
    made = plan(before, fleet)
    now = {**before, "new": 0.1}
    assert not drifted(before, now) and homeless(made, now, fleet)
    assert not homeless(plan(now, fleet), now, fleet)
    full = [Host("a", 1.0, 1), Host("b", 1.0, 1)]
    assert not homeless(plan(before, full), now, full)  # no room: no new plan for it


def test_a_moved_model_is_kept_by_its_old_home_until_a_new_home_has_it_loaded() -> None:
    made = plan({"hot": 6.0, "cold": 1.0}, [Host("b", 1.0, 2)])  # both moved to b
    was = frozenset({"hot", "cold", "gone"})
    announced = {"b": frozenset({"hot", "cold"})}
    holds = {"a": was, "b": frozenset()}
    assert keeping("a", was, made, holds, announced) == {"hot", "cold"}  # not "gone": no demand
    assert keeping("a", was, made, holds | {"a": frozenset({"hot"})}, announced) == {"hot"}
    holds["b"] = frozenset({"hot"})  # b has hot loaded: a hands it over
    assert keeping("a", was, made, holds, announced) == {"cold"}
    assert keeping("a", was, made, holds, {"b": frozenset({"cold"})}) == {"hot", "cold"}


@given(
    demands,
    hosts,
    st.lists(st.frozensets(st.sampled_from([f"m{i}" for i in range(15)])), min_size=12),
    st.lists(st.frozensets(st.sampled_from([f"m{i}" for i in range(15)])), min_size=12),
)
def test_a_placed_model_someone_holds_is_always_someones(
    demand: dict, fleet: list[Host], held: list[frozenset[str]], hosted: list[frozenset[str]]
) -> None:
    """Whatever the plan and whatever each agent announced, a model the plan places that
    some agent holds ends up announced by an agent that holds it: never nobody's."""
    made = plan(demand, fleet)
    names = [h.name for h in fleet]
    holds, announced = dict(zip(names, held, strict=False)), dict(zip(names, hosted, strict=False))
    after = {n: made.for_agent(n) | keeping(n, announced[n], made, holds, announced) for n in names}
    for model in made.homes:
        if any(model in models for models in holds.values()):
            assert any(model in after[n] and model in holds[n] for n in names), model


def test_a_model_the_plans_left_nobodys_is_adopted_by_its_first_holder() -> None:
    made = plan({"m": 1.0}, [Host("c", 1.0, 1)])  # c's plan: m is c's, but c never took it
    holds = {"a": frozenset({"m"}), "b": frozenset({"m"}), "c": frozenset()}
    assert keeping("a", frozenset(), made, holds, {}) == {"m"}
    assert keeping("b", frozenset(), made, holds, {}) == frozenset()  # a adopts, not both
    assert keeping("a", frozenset(), made, holds, {"b": frozenset({"m"})}) == frozenset()


def test_a_model_without_a_home_queues_where_it_is_loaded_within_the_slack() -> None:
    router = Router(Policy(home_slack=2.0, load_floor=1.0))
    router.set_members([member(f"a{i}") for i in range(4)])
    router.set_loaded("a2", {"m"})  # loaded (or loading) there, one task already
    router.set_load("a2", 1, 0)
    assert router.route(Request("t1", "m", "sleep")).first.name == "a2"  # wait, not load
    router.set_load("a2", 3, 0)  # past the floor and the slack: a load elsewhere
    assert router.route(Request("t1", "m", "sleep")).first.name != "a2"
    router.set_load("a2", 1, 0)
    router.set_homes({"m": ("a0",)})  # with a home, the home's slack decides
    assert router.route(Request("t1", "m", "sleep")).first.name == "a0"


@given(
    st.lists(
        st.builds(
            Host,
            st.sampled_from([f"a{i}" for i in range(30)]),
            st.sampled_from([0.5, 1.0, 2.0, 8.0]),  # ties in weight left, broken by name
            st.integers(1, 4),
            st.frozensets(st.sampled_from(["m0", "m1", "m2"]), max_size=2),
        ),
        min_size=1,
        max_size=30,
        unique_by=lambda h: h.name,
    ),
    st.lists(st.sampled_from([f"a{i}" for i in range(34)]), max_size=6, unique=True),
    st.data(),
)
def testcandidates_come_in_the_order_a_full_sort_by_rank_gives(
    fleet: list[Host], planned: list[str], data: st.DataObject
) -> None:
    """The planner's order of candidate homes (planned first, then holders, then by weight
    left, then by name) without sorting every agent with a key: the same order."""
    by_name = {h.name: h for h in fleet}
    left = {h.name: data.draw(st.sampled_from([0.0, h.weight / 2, h.weight])) for h in fleet}
    holders: dict[str, set[str]] = {}
    for host in fleet:
        for model in host.loaded:
            holders.setdefault(model, set()).add(host.name)

    def rank(name: str) -> tuple[bool, bool, float, str]:
        return (name not in planned, "m0" not in by_name[name].loaded, -left[name], name)

    found = list(candidates("m0", by_name, left, tuple(planned), holders))
    assert found == sorted(by_name, key=rank)
