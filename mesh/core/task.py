"""What a valid task is: the checks a submission must pass, in one pure function.

Each limit is a named config field and each failure a precise error: malformed or unknown
→ ``InvalidTask`` (INVALID_ARGUMENT), too big → ``LimitExceeded`` (RESOURCE_EXHAUSTED),
already late → ``DeadlinePassed`` (DEADLINE_EXCEEDED). No I/O, so it is tested by tables.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from mesh.config import NAME_PATTERN, AgentConfig
from mesh.errors import DeadlinePassed, InvalidTask, LimitExceeded
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

TERMINAL = frozenset({pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELLED})
TASK_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
NAME = re.compile(NAME_PATTERN)


def public(status: pb.TaskStatus) -> pb.TaskStatus:
    """The status as clients see it: without the payload kept for re-runs, and with a
    stored result named by the task (``GetResult`` fetches it), not by the path of the
    file on its agent's disk."""
    out = pb.TaskStatus()
    out.CopyFrom(status)
    out.spec.ClearField("payload")
    if out.result.WhichOneof("body") == "uri":
        out.result.uri = result_ref(out.task_id)
    return out


def result_ref(task_id: str) -> str:
    """What a client sees for a result stored on an agent: a name, never a path."""
    return f"mesh:tasks/{task_id}/result"


def state_name(state: int) -> str:
    return pb.TaskState.Name(state).removeprefix("TASK_STATE_")


@dataclass(frozen=True, slots=True)
class Admitted:
    """A spec that passed validation, normalised, with its absolute deadline."""

    spec: pb.TaskSpec
    deadline_ms: int
    digest: str


def spec_digest(spec: pb.TaskSpec) -> str:
    """Identity of a submission, to tell an idempotent resubmit from a reused id.

    The deadline and timeout are left out: a client retrying with a fresh timeout is still
    submitting the same task.
    """
    same = pb.TaskSpec()
    same.CopyFrom(spec)
    same.ClearField("deadline")
    same.ClearField("timeout")
    return hashlib.sha256(same.SerializeToString(deterministic=True)).hexdigest()


AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
DC_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
RESUME_TOKEN = re.compile(rf"({DC_NAME.pattern}):([0-9]{{1,19}})")  # "<dc>:<revision>"
MAX_REVISION = 2**63 - 1  # etcd's revisions are int64


def resume_point(token: str) -> tuple[str, int]:
    """The DC and revision a Watch resume token (``"<dc>:<revision>"``) names; ("", 0)
    for none. ``InvalidTask`` for anything else: a token is the mesh's, never free text."""
    if not token:
        return "", 0
    match = RESUME_TOKEN.fullmatch(token)
    if match is None or int(match[2]) > MAX_REVISION:
        raise InvalidTask("resume_token is not one this mesh issued")
    return match[1], int(match[2])


MAX_PATH = 16


def check_offer(
    envelope: peer_pb2.Envelope, cfg: AgentConfig, known_pipelines: Collection[str], now_ms: int
) -> None:
    """An offer is validated as a Submit is: its spec must pass ``admit`` unchanged (the
    entry agent admitted it), and the envelope's own fields are bounded."""
    if envelope.origin_dc and not DC_NAME.fullmatch(envelope.origin_dc):
        raise InvalidTask("origin_dc is no DC name")
    if len(envelope.path) > MAX_PATH or not all(
        step == "backlog" or AGENT_ID.fullmatch(step) for step in envelope.path
    ):
        raise InvalidTask(f"path must be at most {MAX_PATH} agent ids")
    if envelope.entry_agent and not AGENT_ID.fullmatch(envelope.entry_agent):
        raise InvalidTask("entry_agent is no agent id")
    if not 1 <= envelope.attempt <= MAX_ATTEMPT:
        raise InvalidTask(f"attempt must be 1-{MAX_ATTEMPT}")
    if not 0 <= envelope.max_tasks <= MAX_TASKS:  # NaN fails too
        raise InvalidTask(f"max_tasks must be 0-{MAX_TASKS}")
    if not 0 <= envelope.waited_s <= MAX_WAITED_S:
        raise InvalidTask(f"waited_s must be 0-{MAX_WAITED_S:g}")
    if not envelope.spec.task_id:
        raise InvalidTask("an offered task has its id")
    _as_admitted(envelope.spec, cfg, known_pipelines, now_ms, "offered")


MAX_STAGE_BYTES = 1 << 20  # a stage's input: activations between agents, not payloads


def check_stage(
    request: peer_pb2.StageRequest, cfg: AgentConfig, known_pipelines: Collection[str], now_ms: int
) -> None:
    """A stage request's spec must pass ``admit`` unchanged, as an offer's does; its
    layers and input are bounded (the pipeline checks the layers against the model)."""
    if not 1 <= request.attempt <= MAX_ATTEMPT:
        raise InvalidTask(f"attempt must be 1-{MAX_ATTEMPT}")
    if request.count < 1:
        raise InvalidTask("a stage runs at least one layer")
    if len(request.input) > MAX_STAGE_BYTES:
        raise InvalidTask(f"a stage's input is at most {MAX_STAGE_BYTES} bytes")
    if not request.spec.task_id:
        raise InvalidTask("a stage's task has its id")
    _as_admitted(request.spec, cfg, known_pipelines, now_ms, "stage's")


def _as_admitted(
    sent: pb.TaskSpec, cfg: AgentConfig, known_pipelines: Collection[str], now_ms: int, what: str
) -> None:
    spec = pb.TaskSpec()
    spec.CopyFrom(sent)
    spec.ClearField("deadline")  # the envelope's (or the call's) deadline governs it
    spec.ClearField("timeout")
    if admit(spec, cfg, known_pipelines, now_ms).spec != spec:
        raise InvalidTask(f"the {what} spec is not as its entry agent admitted it")


MAX_ATTEMPT = 100
MAX_TASKS = 1_000_000
MAX_WAITED_S = 7 * 24 * 3600.0  # a queued task's wait carried along: no task waits longer


def check_id(task_id: str) -> None:
    """A task id as every request must carry it: 1-128 of ``[A-Za-z0-9._:-]``, whole."""
    if not TASK_ID.fullmatch(task_id):
        raise InvalidTask("task_id must be 1-128 characters of [A-Za-z0-9._:-]")


def admit(
    spec: pb.TaskSpec,
    cfg: AgentConfig,
    known_pipelines: Collection[str],
    now_ms: int,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> Admitted:
    """Validate and normalise a submitted spec, or raise the error the client should see;
    ``new_id`` names a task submitted without an id."""
    out = pb.TaskSpec()
    out.CopyFrom(spec)
    if out.task_id:
        check_id(out.task_id)
    else:
        out.task_id = new_id()
    if not out.user.id:
        raise InvalidTask("user.id is required", task_id=out.task_id)
    if out.task_type == pb.TASK_TYPE_UNSPECIFIED:
        out.task_type = pb.TASK_TYPE_CUSTOM  # pipeline and model are enough to start
    if out.task_type not in pb.TaskType.values():
        raise InvalidTask(f"unknown task_type {out.task_type}", task_id=out.task_id)
    if not out.pipeline:
        raise InvalidTask("pipeline is required", task_id=out.task_id)
    if out.pipeline not in known_pipelines:
        raise InvalidTask(
            f"unknown pipeline {out.pipeline!r}; this DC runs {sorted(known_pipelines)}",
            task_id=out.task_id,
        )
    if not out.model or not NAME.fullmatch(out.model):
        raise InvalidTask("model is required: 1-128 characters of [A-Za-z0-9._:/-]")
    if not out.queue:
        out.queue = cfg.default_queue
    if out.queue not in cfg.queues:
        raise InvalidTask(
            f"unknown queue {out.queue!r}; classes are {sorted(cfg.queues)}", task_id=out.task_id
        )
    if out.rerun_of and not TASK_ID.fullmatch(out.rerun_of):
        raise InvalidTask("rerun_of must be a task id", task_id=out.task_id)
    if out.affinity_key and len(out.affinity_key) > 256:
        raise InvalidTask("affinity_key is longer than 256 characters", task_id=out.task_id)
    if out.gpu_count == 0:
        out.gpu_count = 1
    if len(out.payload) > cfg.max_payload_bytes:
        raise LimitExceeded(
            "payload too large",
            task_id=out.task_id,
            size=len(out.payload),
            limit="max_payload_bytes",
            max=cfg.max_payload_bytes,
        )
    if len(out.params) > cfg.max_params:
        raise LimitExceeded("too many params", limit="max_params", max=cfg.max_params)
    for key, value in out.params.items():
        if max(len(key), len(value)) > cfg.max_param_bytes:
            raise LimitExceeded(
                f"param {key[:32]!r} too long", limit="max_param_bytes", max=cfg.max_param_bytes
            )
    if "media_type" in out.params and not media_type_ok(out.params["media_type"]):
        raise InvalidTask("params.media_type is not a media type (type/subtype[; k=v])")
    return Admitted(out, _deadline_ms(out, cfg, now_ms), spec_digest(out))


_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|\"[^\"\\\x00-\x1f\x7f]*\"))*"
)
DEFAULT_MEDIA_TYPE = "application/octet-stream"


def media_type_ok(text: str) -> bool:
    """Whether ``text`` is a media type as RFC 6838 spells one (no CR, LF or other control
    character can pass): it becomes a Content-Type header, so a CR/LF would split it."""
    return len(text) <= 255 and MEDIA_TYPE.fullmatch(text) is not None


def media_type(text: str) -> str:
    """``text`` if it is a media type, else the generic one (what a pipeline returns is
    checked before it is recorded, as a request's params are at admission)."""
    return text if media_type_ok(text) else DEFAULT_MEDIA_TYPE


def _deadline_ms(spec: pb.TaskSpec, cfg: AgentConfig, now_ms: int) -> int:
    has_deadline, has_timeout = spec.HasField("deadline"), spec.HasField("timeout")
    if has_deadline and has_timeout:
        raise InvalidTask("give deadline or timeout, not both", task_id=spec.task_id)
    if has_deadline:
        deadline = spec.deadline.ToMilliseconds()
    elif has_timeout:
        deadline = now_ms + spec.timeout.ToMilliseconds()
    else:
        deadline = now_ms + int(cfg.default_deadline_s * 1000)
    if deadline <= now_ms:
        raise DeadlinePassed("the task's deadline has already passed", task_id=spec.task_id)
    return min(deadline, now_ms + int(cfg.max_deadline_s * 1000))


def page_token(last_task_id: str) -> str:
    """An opaque continuation for List: the last task id a page covered."""
    return base64.urlsafe_b64encode(last_task_id.encode()).decode().rstrip("=")


def page_start(token: str) -> str:
    """The task id a page token continues after ("" for none); ``InvalidTask`` if the
    token is not one this mesh made."""
    if not token:
        return ""
    try:
        task_id = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidTask("page_token is not one this mesh issued") from None
    check_id(task_id)
    return task_id
