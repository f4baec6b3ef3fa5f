"""The skeleton's placement order: pure, so checked without any process."""

from __future__ import annotations

from mesh.gpus import parse_fake
from mesh.placement import candidates, eligible
from mesh.registry import ACTIVE, DRAINING, AgentRecord
from mesh.v1 import tasks_pb2 as pb


def agent(agent_id: str, **overrides: object) -> AgentRecord:
    fields: dict[str, object] = {
        "agent_id": agent_id,
        "dc": "west",
        "address": f"{agent_id}:1",
        "gpus": tuple(parse_fake("2xA100-80GB")),
        "weight": 1.2,
        "pipelines": ("sleep", "echo"),
        "models": (),
        "state": ACTIVE,
        **overrides,
    }
    return AgentRecord(**fields)  # type: ignore[arg-type]


def spec(**fields: object) -> pb.TaskSpec:
    defaults: dict[str, object] = {"task_id": "t-1", "pipeline": "sleep", "model": "sdxl"}
    return pb.TaskSpec(**{**defaults, **fields})  # type: ignore[arg-type]


def test_eligibility_rules() -> None:
    assert eligible(agent("a"), spec())
    assert not eligible(agent("a", state=DRAINING), spec())
    assert not eligible(agent("a", pipelines=("echo",)), spec())
    assert not eligible(agent("a", models=("llama",)), spec())
    assert eligible(agent("a", models=("sdxl",)), spec())
    assert not eligible(agent("a"), spec(gpu_count=3))
    assert not eligible(agent("a"), spec(min_gpu_memory_mb=100_000))
    mixed = agent("a", gpus=tuple(parse_fake("1xA100-80GB,1xT4-16GB")))
    assert eligible(mixed, spec(min_gpu_memory_mb=40_000))
    assert not eligible(mixed, spec(gpu_count=2, min_gpu_memory_mb=40_000))


def test_self_first_then_warm_peers_then_the_rest() -> None:
    agents = [
        agent("cold-1"),
        agent("warm", models_loaded=("sdxl",)),
        agent("me"),
        agent("cold-2"),
        agent("unable", pipelines=("echo",)),
    ]
    order = candidates(spec(), "me", agents, visited=[])
    assert order[:2] == ["me", "warm"]
    assert sorted(order[2:]) == ["cold-1", "cold-2"]


def test_visited_agents_are_never_offered_again() -> None:
    agents = [agent("a"), agent("b"), agent("c")]
    assert candidates(spec(), "a", agents, visited=["a", "b"]) == ["c"]


def test_peer_order_is_deterministic_and_spreads_by_task() -> None:
    agents = [agent(f"p{i}") for i in range(8)]
    firsts = {candidates(spec(task_id=f"t{i}"), "me", agents, visited=[])[0] for i in range(200)}
    assert candidates(spec(), "me", agents, []) == candidates(spec(), "me", agents[::-1], [])
    assert len(firsts) == 8
