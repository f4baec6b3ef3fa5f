"""What routing talks about: members, requests, policy, overflow options, targets and
decisions. Plain immutable data, shared by the router, the decision log and the agents;
``mesh.core.router`` holds the decision itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

AGENT = "agent"
DC = "dc"
BACKLOG = "backlog"
HARD_LIMIT = 0.0  # a target's max_load meaning "up to the receiver's hard limit"


@dataclass(frozen=True, slots=True)
class Member:
    """What routing needs to know of an agent of this DC."""

    agent_id: str
    weight: float
    gpu_memory_mb: tuple[int, ...]
    pipelines: frozenset[str]
    models: frozenset[str] = frozenset()  # servable; empty: any model
    draining: bool = False
    queue_limit: int = 256

    @property
    def slots(self) -> int:
        return max(1, len(self.gpu_memory_mb))


@dataclass(frozen=True, slots=True)
class Request:
    """The routing-relevant part of a task."""

    task_id: str
    model: str
    pipeline: str
    affinity_key: str = ""
    gpu_count: int = 1
    min_gpu_memory_mb: int = 0
    run_s: float = 0.0  # how long it should run (0: unknown)
    load_s: float = 0.0  # how long a load of its model takes (0: unknown)

    @property
    def key(self) -> str:
        base = f"{self.model}/{self.pipeline}"
        return f"{base}/{self.affinity_key}" if self.affinity_key else base

    @property
    def needs(self) -> tuple[str, str, int, int]:
        return (self.pipeline, self.model, max(1, self.gpu_count), self.min_gpu_memory_mb)


@dataclass(frozen=True, slots=True)
class Policy:
    load_factor: float = 1.25
    load_floor: float = 1.0  # tasks per slot any agent may hold whatever the average
    ring_tries: int = 3  # agents that may take the task offered before two choices
    affinity_window: int = 8  # of the first agents that may take it, loaded ones go first
    # A model's planned homes (or, for a model with no home, the agents that hold it) may
    # hold this many more tasks per unit of GPU weight than the bound: waiting behind warm
    # work beats paying a model load elsewhere.
    home_slack: float = 0.0


@dataclass(frozen=True, slots=True)
class Overflow:
    dc: str
    weight: float


@dataclass(frozen=True, slots=True)
class Spill:
    """What this DC may do beyond itself for the next task."""

    to: tuple[Overflow, ...] = ()
    allowed: bool = True  # False once this DC has sent its maximum share recently
    full: frozenset[str] = frozenset()  # DCs known to have no free capacity


NO_SPILL = Spill()
NOBODY: frozenset[str] = frozenset()


class Target(NamedTuple):  # tuples, not frozen dataclasses: built on every decision
    kind: str  # AGENT, DC or BACKLOG
    name: str
    max_tasks: float  # running + queued the receiver may reach; HARD_LIMIT: up to its limit
    reason: str


TO_BACKLOG = Target(BACKLOG, "", HARD_LIMIT, "backlog: every eligible agent is full")
NONE_ELIGIBLE = Target(BACKLOG, "", HARD_LIMIT, "backlog: no eligible agent in this DC")


class Candidate(NamedTuple):
    """One agent as ``explain`` shows it, in ring order."""

    agent_id: str
    tasks: int
    max_tasks: float
    eligible: bool
    loaded: bool
    verdict: str


class Decision(NamedTuple):
    targets: tuple[Target, ...]
    bound: float  # tasks per unit of GPU weight
    candidates: tuple[Candidate, ...] = ()

    @property
    def first(self) -> Target:
        return self.targets[0]

    def to_dict(self) -> dict[str, object]:
        return {
            "targets": [t._asdict() for t in self.targets],
            "bound": self.bound,
            "candidates": [c._asdict() for c in self.candidates],
        }


def eligible(member: Member, needs: tuple[str, str, int, int]) -> bool:
    pipeline, model, gpu_count, min_memory = needs
    if member.draining or pipeline not in member.pipelines:
        return False
    if member.models and model not in member.models:
        return False
    return sum(1 for m in member.gpu_memory_mb if m >= min_memory) >= gpu_count


def spill_to_dict(spill: Spill) -> dict[str, object]:
    return {
        "to": [asdict(o) for o in spill.to],
        "allowed": spill.allowed,
        "full": sorted(spill.full),
    }


def spill_from_dict(data: dict[str, Any]) -> Spill:
    return Spill(
        to=tuple(Overflow(**o) for o in data["to"]),
        allowed=data["allowed"],
        full=frozenset(data["full"]),
    )
