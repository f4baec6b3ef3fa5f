"""The agent's one validated configuration object.

Every field maps one-to-one onto a ``mesh-agent`` flag (``--lease-ttl-s``), a ``MESH_*``
environment variable (``MESH_LEASE_TTL_S``) and a key of the YAML file given by
``--config``; that is also the priority order. It is validated before any socket opens,
and a bad value is reported per field, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from mesh.errors import ConfigError
from mesh.trust.tokens import MAX_TTL

MiB = 1024 * 1024
SECRET_FLAGS = {"--gossip-keys"}
PLACEHOLDERS = ("change-me", "changeme", "replace-me", "placeholder")
# A model or pipeline name: what users put in TaskSpec.model and TaskSpec.pipeline.
NAME_PATTERN = r"^[A-Za-z0-9._:/-]{1,128}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def state_home() -> Path:
    """The agent's own state folder: ``$XDG_STATE_HOME/gpumesh``, else
    ``~/.local/state/gpumesh``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpumesh"


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MESH_", extra="forbid", cli_kebab_case=True, validate_default=True
    )

    # Identity and coordination.
    agent_id: str = Field(
        default_factory=lambda: socket.gethostname().split(".")[0],
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="Unique name of this agent in its DC. Default: the short host name.",
    )
    dc: str = Field(
        "local", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="Datacenter this agent is in."
    )
    prefix: str = Field(
        "gpumesh",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Root of every etcd key; lets several meshes (or tests) share one etcd.",
    )
    etcd_endpoints: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:2379"],
        min_length=1,
        description="host:port of the DC's etcd members; the agent uses the first that answers.",
    )
    lease_ttl_s: int = Field(
        5,
        ge=2,
        le=60,
        description="Membership lease TTL. Shorter: a dead agent is noticed sooner; longer: "
        "fewer false deaths when an agent or etcd stalls. Kept alive every TTL/3.",
    )

    # Trust: every port TLS, every caller identified (the README's "Security").
    mesh_name: str = Field(
        "gpumesh",
        pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$",
        description="The mesh's trust domain: identities are spiffe://<mesh_name>/..., tokens "
        "name it as issuer and audience. Every agent and client of one mesh uses the same.",
    )
    tls_ca: Path | None = Field(
        None,
        description="The mesh CA's certificate (PEM): peers, clients and etcd are verified "
        "against it. Bring your own CA (cert-manager, SPIRE, Vault) by pointing here.",
    )
    tls_cert: Path | None = Field(
        None,
        description="This agent's certificate (PEM) from the mesh CA ('meshctl pki issue "
        "agent'): its server certificate, and its client certificate for peers and etcd.",
    )
    tls_key: Path | None = Field(None, description="Its private key (PEM), readable by it alone.")
    max_token_ttl_s: float = Field(
        MAX_TTL.total_seconds(),
        gt=0,
        description="Bearer tokens that say they live longer than this are refused: a token "
        "cannot be revoked, so a stolen one is good until it expires.",
    )
    insecure: bool = Field(
        False,
        description="Plaintext gRPC and etcd, no identities: any caller may do anything. For a "
        "throwaway experiment only; a warning is logged at every start.",
    )

    # Network.
    listen: str = Field(
        "127.0.0.1:50051",
        description="host:port of the API port (TLS; callers present a bearer token). Port 0: "
        "any free port.",
    )
    peer_listen: str = Field(
        "127.0.0.1:0",
        description="host:port of the mTLS port: PeerService for the other agents, and the API "
        "for callers holding a certificate of the mesh. Port 0: any free port.",
    )
    peer_advertise: str | None = Field(
        None, description="host:port peers dial for the mTLS port; default: the bound address."
    )
    max_concurrent_rpcs: int = Field(
        2000,
        ge=1,
        description="Calls served at once; more are refused with RESOURCE_EXHAUSTED, so a flood "
        "cannot exhaust the agent's memory.",
    )
    advertise: str | None = Field(
        None, description="host:port peers and clients dial; default: the bound listen address."
    )
    metrics_listen: str | None = Field(
        None, description="host:port for Prometheus metrics over HTTP; unset: no metrics server."
    )

    # Hardware and work.
    fake_gpus: str | None = Field(
        None,
        description="Declared inventory for machines without NVML, e.g. '2xA100-80GB,1xA40-48GB'. "
        "Unset: NVML, and no GPUs if NVML is missing.",
    )
    gpu_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Overrides of the GPU-class weight table (class name to weight).",
    )
    models: list[Name] = Field(
        default_factory=list,
        description="Models this agent can serve; empty: any model.",
    )
    preloaded_models: list[Name] = Field(
        default_factory=list, description="Models counted as loaded at start (no load delay)."
    )
    pipelines: list[Name] | None = Field(
        None, description="Pipelines this agent runs; unset: every installed pipeline plugin."
    )
    commands: dict[str, list[str]] = Field(
        default_factory=dict,
        description="argv per command name for the 'command' pipeline. Users pick a name with "
        "params['command']; they never supply argv, so they cannot run arbitrary programs.",
    )
    command_env: list[str] = Field(
        default_factory=lambda: ["PATH", "LANG", "LC_ALL", "TZ", "HOME"],
        description="Variables of the agent's environment a 'command' program sees (beside "
        "CUDA_VISIBLE_DEVICES and MESH_TASK_ID, MESH_ATTEMPT, MESH_MODEL); nothing else, so "
        "a program never reads the agent's secrets.",
    )
    model_load_s: float = Field(
        2.0, ge=0, description="Simulated model-load delay of the 'sleep' pipeline."
    )
    model_memory_mb: dict[Name, int] = Field(
        default_factory=dict,
        description="GPU memory each model takes once loaded (the 'sleep' pipeline declares "
        "these); models fill the agent's GPU memory and the least useful are evicted.",
    )
    placement_plan: bool = Field(
        True,
        description="Act on the DC's placement plan: route a model's tasks to its planned "
        "homes first, keep planned models from eviction, warm them while idle. Off: "
        "demand is still gossiped, and models stay where their tasks happened to run.",
    )
    plan_interval_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How often the agent gossips its demand per model, computes the DC's "
        "placement plan, and warms a model the plan gives it (when a slot is idle).",
    )
    default_model_memory_mb: int = Field(
        0, ge=0, description="GPU memory of a model model_memory_mb does not name (0: none)."
    )
    queues: dict[str, int] = Field(
        default_factory=lambda: {"vip": 8, "normal": 2},
        min_length=1,
        description="Queue classes and their weights: vip 8, normal 2 gives vip ~8 of 10 slots "
        "while both wait.",
    )
    default_queue: str = Field("normal", description="Class of a task that names none.")
    queue_aging_s: float = Field(
        30.0,
        gt=0,
        description="A task that has waited this long is taken next, whatever its class: the "
        "bound on starvation. Shorter: fairer to light classes; longer: weights hold better.",
    )
    http_listen: str | None = Field(
        "127.0.0.1:0",
        description="host:port of the HTTP/JSON API and the web console (/ui): TLS with the "
        "agent's certificate, callers present a bearer token. Port 0: any free port; unset: "
        "no HTTP.",
    )
    http_advertise: str = Field("", description="host:port clients use for http_listen")
    http_cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose pages may call the HTTP API (CORS); none by default.",
    )
    span_dir: Path | None = Field(
        None,
        description="Write this agent's trace spans here as JSON lines (meshctl trace reads "
        "them); OTLP export is set with the standard OTEL_EXPORTER_OTLP_ENDPOINT.",
    )
    trace_sample_ratio: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of the traces begun here that are recorded (parent-based: a call "
        "carrying a traceparent is recorded as its flag says). Failed and slow tasks are "
        "recorded anyway, as one span at their end (trace_slow_s). 1: every trace, as a "
        "developer reading meshctl trace wants; the default costs little under load.",
    )
    trace_slow_s: float = Field(
        10.0,
        gt=0,
        description="A task that took longer than this from Submit to its end is recorded "
        "at its end though its trace was not sampled, as a failed one is.",
    )
    preempt_after_s: float = Field(
        0.5,
        ge=0,
        description="An online task that waited this long here for a slot batch borrowed takes "
        "it back (the batch run is preempted). Shorter: online starts sooner; longer: fewer "
        "batch runs are lost when a slot elsewhere frees first.",
    )

    # Limits: each enforced with a precise gRPC status.
    max_payload_bytes: int = Field(
        4 * MiB, ge=0, description="Largest task payload (RESOURCE_EXHAUSTED above it)."
    )
    inline_payload_bytes: int = Field(
        64 * 1024,
        ge=0,
        le=1 * MiB,
        description="Payloads up to this size are kept in the etcd task record; larger ones stay "
        "in the executing agent's memory only. etcd is not a blob store.",
    )
    inline_result_bytes: int = Field(
        64 * 1024,
        ge=0,
        le=1 * MiB,
        description="Results up to this size are stored inline; larger ones go to result_dir "
        "and the record holds a file:// URI.",
    )
    max_params: int = Field(64, ge=0, description="Most entries in a task's params map.")
    max_param_bytes: int = Field(4096, ge=1, description="Largest key or value in params.")
    default_deadline_s: float = Field(
        600.0, gt=0, description="Deadline of a task that gives none."
    )
    max_deadline_s: float = Field(
        86400.0, gt=0, description="Every deadline is clamped to at most this far ahead."
    )
    max_queue_length: int = Field(
        256, ge=1, description="Local queue bound; a full agent refuses offers."
    )
    work_conserving: bool = Field(
        True,
        description="Offer queued tasks to idle agents of the DC when they would start "
        "there sooner (off: a task waits where it was accepted).",
    )
    task_retention_s: float = Field(
        86400.0,
        ge=1,
        description="How long a finished task's record, claim and stored result are kept "
        "(etcd deletes records through leases shared by time bucket: no sweep).",
    )
    max_hops: int = Field(3, ge=1, le=16, description="Most forwards a task may take.")
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Runs a task gets when its agents die under it; then it fails with the "
        "reason. Tasks run at least once, so a pipeline dedups by (task_id, attempt).",
    )
    max_list: int = Field(500, ge=1, description="Most tasks one List call returns.")
    drain_notice_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="On SIGTERM, how long the agent still answers and forwards calls after it "
        "reported NOT_SERVING and showed as draining, so clients move away without an error. "
        "Longer: safer for slow balancers; shorter: a quicker stop.",
    )
    drain_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, time running tasks get to finish before hand-back."
    )
    loop_lag_tick_s: float = Field(
        0.05,
        ge=0,
        description="How often the event loop's lateness is sampled "
        "(gpumesh_event_loop_lag_seconds); 0: not measured (the simulator: virtual time "
        "has no lag to measure).",
    )
    progress_interval_s: float = Field(
        0.2, ge=0, description="Least time between two progress writes of one task to etcd."
    )
    result_dir: Path = Field(
        default_factory=lambda: state_home() / "results",
        description="Where results over inline_result_bytes are written: a folder of the "
        "agent's own (0700; a link or another user's folder is refused), by default under "
        "$XDG_STATE_HOME/gpumesh (~/.local/state/gpumesh), never a shared /tmp path.",
    )
    # Gossip of load and loaded models inside the DC (UDP).
    gossip_listen: str = Field(
        "127.0.0.1:0", description="host:port of the gossip UDP socket (port 0: any free port)."
    )
    gossip_advertise: str | None = Field(
        None, description="host:port peers send gossip to; default: the bound gossip address."
    )
    gossip_keys: list[SecretStr] = Field(
        default_factory=list,
        description="HMAC keys (16+ characters), newest first: datagrams are signed with the "
        "first and accepted with any, so a key is rotated by deploying [new, old], then [new]. "
        "Secrets: from MESH_GOSSIP_KEYS, the config file or gossip_key_file, never a flag.",
    )
    gossip_key_file: Path | None = Field(
        None, description="A file of gossip keys, one per line, newest first (keep it 0600)."
    )
    gossip_interval_s: float = Field(
        0.2, gt=0, description="Time between gossip rounds. Shorter: fresher loads, more bytes."
    )
    gossip_fanout: int = Field(
        3, ge=1, le=16, description="Peers contacted per round. Higher: faster spread, more bytes."
    )
    gossip_stale_s: float = Field(
        8.0,
        gt=0,
        description="A peer's gossiped state not refreshed for this long leaves the routing "
        "view (the peer is de-prioritised until it is heard again).",
    )
    gossip_drop_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of outgoing gossip datagrams to discard: a fault hook for tests.",
    )
    decision_log: Path | None = Field(
        None,
        description="Append every routing decision here as a JSON line (with the view it "
        "was made from), for 'meshctl replay'. Unset: no log.",
    )
    history: Path | None = Field(
        None,
        description="Append what this agent does to tasks (runs, commits, owner writes with "
        "their fencing token) as JSON lines, for the chaos checker. Unset: no history.",
    )
    etcd_outage_grace_s: float = Field(
        30.0,
        ge=0,
        description="While etcd cannot be reached (no quorum, or down), runs under way go on "
        "for this long past the lease TTL: nobody can expire the lease meanwhile. Longer: "
        "fewer tasks lost to etcd outages; shorter: a shorter window in which an agent cut "
        "off from a healthy etcd runs a task that was given to another agent.",
    )
    etcd_refused_retry_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="A Submit whose record etcd refused (no leader, no member reachable) "
        "tries again for at least this long before the task goes to an overflow DC: the "
        "client's retry of a Submit whose write timed out may land here, and that write may "
        "yet be applied. Cover an etcd election (under a second); longer delays overflow.",
    )
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @property
    def max_message_bytes(self) -> int:
        """gRPC message cap: the largest payload plus room for the envelope."""
        return self.max_payload_bytes + 1 * MiB

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.default_queue not in self.queues:
            raise ValueError(f"default_queue {self.default_queue!r} is not one of the queues")
        if any(w <= 0 for w in self.queues.values()):
            raise ValueError("queue weights must be positive")
        if self.default_deadline_s > self.max_deadline_s:
            raise ValueError("default_deadline_s exceeds max_deadline_s")
        if self.inline_payload_bytes > self.max_payload_bytes:
            raise ValueError("inline_payload_bytes exceeds max_payload_bytes")
        for name, argv in self.commands.items():
            if not argv:
                raise ValueError(f"commands.{name}: argv is empty")
        if self.gossip_key_file is not None:
            try:
                text = self.gossip_key_file.read_text()
            except OSError as exc:
                raise ValueError(f"gossip_key_file: {exc.strerror}") from None
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            self.gossip_keys = [SecretStr(line) for line in lines] + self.gossip_keys
        keys = [k.get_secret_value() for k in self.gossip_keys]
        if any(len(key) < 16 for key in keys):
            raise ValueError("gossip_keys: every key needs 16 characters or more")
        if any(marker in key.lower() for key in keys for marker in PLACEHOLDERS):
            raise ValueError("gossip_keys: a placeholder is no key; generate one (openssl rand)")
        if not keys:
            raise ValueError("gossip needs a key: gossip_key_file or MESH_GOSSIP_KEYS")
        if not self.insecure:
            missing = [f for f in ("tls_ca", "tls_cert", "tls_key") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"{', '.join(missing)} unset: every port is TLS ('meshctl pki issue agent'), "
                    "or run with --insecure for a throwaway experiment"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=_config_file))
        return tuple(sources)


_config_file: Path | None = None


def load_agent_config(argv: list[str]) -> AgentConfig:
    """Build the config from flags, ``MESH_*`` variables and ``--config FILE``.

    Raises ``ConfigError`` with one line per bad field.
    """
    global _config_file
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(argv)
    secret = [a for a in rest if a.split("=")[0] in SECRET_FLAGS]
    if secret:
        raise ConfigError(
            f"{secret[0].split('=')[0]}: secrets never go on the command line (any user sees "
            "it in ps); use gossip_key_file or MESH_GOSSIP_KEYS"
        )
    if known.config is not None and not known.config.is_file():
        raise ConfigError(f"config file not found: {known.config}")
    _config_file = known.config
    try:
        cli: CliSettingsSource[Any] = CliSettingsSource(
            AgentConfig,
            cli_parse_args=rest,
            cli_kebab_case=True,
            cli_prog_name="mesh-agent",
        )
        return AgentConfig(_cli_settings_source=cli)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    finally:
        _config_file = None


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        got = f" (got {err['input']!r})" if "input" in err and err["loc"] else ""
        lines.append(f"  {where}: {err['msg']}{got}")
    return "invalid configuration:\n" + "\n".join(lines)
