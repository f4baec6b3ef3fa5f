"""The topology file: DCs and their etcd, overflow between DCs, and mesh-wide routing.

``meshctl topology apply`` writes it (without ``local``) to every DC's etcd, versioned;
agents watch it there and switch to a new version as a whole, without restart. ``local``
describes how ``meshctl up`` stages the topology on one machine (agents with fake GPUs);
operators of a real fleet leave it out and run ``mesh-agent`` per machine. Problems are
reported one per line, each with its path in the file. ``topology/schema.json`` is this
model's JSON Schema (``meshctl topology schema``); a test keeps the two in step.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mesh.config import describe_validation_error
from mesh.errors import ConfigError

NAME = r"^[a-z0-9][a-z0-9-]{0,31}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OverflowTo(Strict):
    dc: str = Field(description="a DC this one may send tasks to when it is full")
    weight: float = Field(1.0, gt=0, description="share of the spilled tasks it gets")


class Dc(Strict):
    etcd: list[str] = Field(min_length=1, description="host:port of each etcd member of the DC")
    seeds: list[str] = Field(
        default_factory=list,
        description="host:port of agents other DCs contact to hand tasks to this DC",
    )
    overflow: list[OverflowTo] = Field(
        default_factory=list,
        description="where this DC spills when every local agent is full, in weight order",
    )
    max_spill_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="most of this DC's recent placements that may go to other DCs",
    )


class Routing(Strict):
    load_factor: float = Field(
        1.25,
        ge=1,
        description="bounded loads: an agent takes a task while its load stays within this "
        "factor of the average. Lower: flatter load, more cold model loads.",
    )
    load_floor: float = Field(
        1.0,
        ge=0,
        description="tasks per GPU slot any agent may hold whatever the average: lets a hot "
        "model fill its home in an idle mesh instead of scattering",
    )
    affinity_window: int = Field(
        8,
        ge=1,
        description="of the first agents on the ring that may take a task, those "
        "with its model loaded go first",
    )
    ring_tries: int = Field(3, ge=1, description="agents offered a task before two choices")
    home_slack: float = Field(
        6.0,
        ge=0,
        description="tasks per unit of GPU weight a model's planned homes (or, for a model "
        "with no home, agents that hold it) may hold beyond the bound: waiting behind warm "
        "work beats a model load elsewhere, which also evicts a model there (about twice a "
        "model load over a task's run time)",
    )
    max_hops: int = Field(3, ge=1, le=16, description="most forwards a task may take")


class LocalAgent(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", description="agent id")
    fake_gpus: str = Field(description="declared GPUs, e.g. 2xA100-80GB")
    models: list[str] = Field(default_factory=list, description="servable; empty: any")
    preloaded_models: list[str] = Field(default_factory=list, description="warm at start")


class Local(Strict):
    agents: dict[str, list[LocalAgent]] = Field(description="agents to start, per DC")
    model_load_s: float = Field(1.0, ge=0, description="simulated model-load delay")
    commands: dict[str, list[str]] = Field(
        default_factory=dict, description="argv per command of the 'command' pipeline"
    )
    max_queue_length: int = Field(256, ge=1, description="each local agent's queue bound")
    model_memory_mb: int = Field(
        0, ge=0, description="GPU memory each model takes on the local agents (0: none)"
    )
    model_sizes_mb: dict[str, int] = Field(
        default_factory=dict,
        description="GPU memory of named models on the local agents (others: model_memory_mb)",
    )
    placement_plan: bool = Field(True, description="local agents act on the placement plan")
    work_conserving: bool = Field(
        True, description="local agents move queued tasks to idle agents of their DC"
    )
    plan_interval_s: float = Field(5.0, gt=0, le=300, description="how often they plan")
    task_retention_s: float = Field(
        86400.0, ge=1, description="each local agent's retention of finished tasks"
    )
    decision_log: bool = Field(
        True, description="each local agent logs its routing decisions (with its whole view)"
    )
    etcd_compaction: str = Field(
        "10m",
        pattern=r"^[0-9]+[smh]$",
        description="history each local etcd keeps (--auto-compaction-retention, periodic)",
    )


class Topology(Strict):
    version: int = Field(1, ge=1, description="format version of this file")
    prefix: str = Field("gpumesh", pattern=r"^[A-Za-z0-9._-]+$", description="etcd key root")
    dcs: dict[str, Dc] = Field(min_length=1, description="every DC of the mesh, by name")
    queues: dict[str, int] = Field(
        default_factory=lambda: {"vip": 8, "normal": 2},
        min_length=1,
        description="queue classes and weights (vip 8, normal 2: ~8 of 10 slots to vip)",
    )
    gpu_weights: dict[str, float] = Field(
        default_factory=dict, description="overrides of the GPU-class weight table"
    )
    routing: Routing = Field(default_factory=Routing, description="how tasks are placed")
    local: Local | None = Field(None, description="a mesh on this machine, for meshctl up")

    @model_validator(mode="after")
    def _check(self) -> Topology:
        problems = [
            f"dcs.{name}: DC names are {NAME}" for name in self.dcs if not re.match(NAME, name)
        ]
        problems += [
            f"queues.{q}: weight must be positive" for q, w in self.queues.items() if w <= 0
        ]
        problems += [
            f"gpu_weights.{c}: weight must be positive"
            for c, w in self.gpu_weights.items()
            if w <= 0
        ]
        for name, dc in self.dcs.items():
            targets = [o.dc for o in dc.overflow]
            problems += [
                f"dcs.{name}.overflow: {t!r} is not a DC of this topology"
                for t in targets
                if t not in self.dcs
            ]
            if name in targets:
                problems.append(f"dcs.{name}.overflow: a DC cannot overflow to itself")
            problems += [
                f"dcs.{name}.overflow: {t!r} listed twice"
                for t in sorted(set(targets))
                if targets.count(t) > 1
            ]
        if self.local is not None:
            problems += [
                f"local.agents.{dc}: no such DC in dcs"
                for dc in self.local.agents
                if dc not in self.dcs
            ]
            ids = [a.id for agents in self.local.agents.values() for a in agents]
            problems += [
                f"local.agents: agent id {i!r} used twice"
                for i in sorted(set(ids))
                if ids.count(i) > 1
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_json(self) -> str:
        """What is applied to etcd: everything but the ``local`` staging section."""
        return self.model_dump_json(exclude={"local"})


def schema() -> dict[str, object]:
    return Topology.model_json_schema()


def parse(data: object, where: str) -> Topology:
    """Validate ``data`` (parsed YAML or JSON); ``where`` names it in the message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


def load(path: Path) -> Topology:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse(data, str(path))
