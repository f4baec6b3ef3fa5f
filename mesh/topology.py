"""The topology file: which DCs exist, where their etcd is, and the mesh-wide classes.

``local`` describes how ``meshctl up`` stages the topology on one machine (agents with
fake GPUs); operators of a real fleet leave it out and run ``mesh-agent`` per machine.
Problems are reported one per line, each with its path in the file.
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


class Dc(Strict):
    etcd: list[str] = Field(min_length=1, description="host:port of each etcd member of the DC")


class LocalAgent(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    fake_gpus: str = Field(description="declared GPUs, e.g. 2xA100-80GB")
    models: list[str] = Field(default_factory=list, description="servable; empty: any")
    preloaded_models: list[str] = Field(default_factory=list)


class Local(Strict):
    agents: dict[str, list[LocalAgent]] = Field(description="agents to start, per DC")
    model_load_s: float = Field(1.0, ge=0, description="simulated model-load delay")
    commands: dict[str, list[str]] = Field(
        default_factory=dict, description="argv per command of the 'command' pipeline"
    )


class Topology(Strict):
    version: int = Field(1, ge=1)
    prefix: str = Field("gpumesh", pattern=r"^[A-Za-z0-9._-]+$")
    dcs: dict[str, Dc] = Field(min_length=1)
    queues: dict[str, int] = Field(default_factory=lambda: {"vip": 8, "normal": 2}, min_length=1)
    local: Local | None = None

    @model_validator(mode="after")
    def _check(self) -> Topology:
        problems = [
            f"dcs.{name}: DC names are {NAME}" for name in self.dcs if not re.match(NAME, name)
        ]
        problems += [
            f"queues.{q}: weight must be positive" for q, w in self.queues.items() if w <= 0
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


def load(path: Path) -> Topology:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
