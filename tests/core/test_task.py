"""What a valid task is: every rule of ``admit``, by table, with the error each one raises."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support import config

from mesh.config import state_home
from mesh.core.task import (
    MAX_WAITED_S,
    admit,
    check_offer,
    media_type,
    media_type_ok,
    public,
    resume_point,
    spec_digest,
)
from mesh.errors import DeadlinePassed, InvalidTask, LimitExceeded, MeshError
from mesh.v1 import peer_pb2
from mesh.v1 import tasks_pb2 as pb

NOW_MS = 1_800_000_000_000
PIPELINES = {"sleep", "echo"}
CFG = config(
    max_payload_bytes=1024,
    inline_payload_bytes=512,
    max_params=2,
    max_param_bytes=16,
    default_deadline_s=60,
    max_deadline_s=3600,
)


def valid() -> pb.TaskSpec:
    return pb.TaskSpec(
        task_id="t-1",
        user=pb.User(id="ada", group="g", role="r"),
        task_type=pb.TASK_TYPE_T2I,
        pipeline="sleep",
        model="sdxl-1.0",
    )


def with_(change: Callable[[pb.TaskSpec], object]) -> pb.TaskSpec:
    spec = valid()
    change(spec)
    return spec


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        (with_(lambda s: setattr(s, "task_id", "has space")), InvalidTask, "task_id"),
        (with_(lambda s: s.user.ClearField("id")), InvalidTask, "user.id"),
        (with_(lambda s: setattr(s, "task_type", 99)), InvalidTask, "unknown task_type"),
        (with_(lambda s: s.ClearField("pipeline")), InvalidTask, "pipeline is required"),
        (with_(lambda s: setattr(s, "pipeline", "paint")), InvalidTask, "unknown pipeline"),
        (with_(lambda s: s.ClearField("model")), InvalidTask, "model is required"),
        (with_(lambda s: setattr(s, "model", "a b")), InvalidTask, "model"),
        (with_(lambda s: setattr(s, "queue", "gold")), InvalidTask, "unknown queue 'gold'"),
        (with_(lambda s: setattr(s, "affinity_key", "k" * 257)), InvalidTask, "affinity_key"),
        (with_(lambda s: setattr(s, "payload", b"x" * 1025)), LimitExceeded, "payload"),
        (with_(lambda s: s.params.update(a="1", b="2", c="3")), LimitExceeded, "params"),
        (with_(lambda s: s.params.update(a="v" * 17)), LimitExceeded, "too long"),
        (with_(lambda s: s.deadline.FromMilliseconds(NOW_MS)), DeadlinePassed, "passed"),
        (with_(lambda s: s.timeout.FromMilliseconds(-1)), DeadlinePassed, "passed"),
        (
            with_(lambda s: (s.timeout.FromSeconds(5), s.deadline.FromSeconds(2_000_000_000))),
            InvalidTask,
            "not both",
        ),
    ],
)
def test_each_bad_input_has_its_error(
    spec: pb.TaskSpec, error: type[MeshError], words: str
) -> None:
    with pytest.raises(error) as caught:
        admit(spec, CFG, PIPELINES, NOW_MS)
    assert words in caught.value.message


def test_status_codes_follow_the_error_kind() -> None:
    assert InvalidTask("x").code == "INVALID_ARGUMENT"
    assert LimitExceeded("x").code == "RESOURCE_EXHAUSTED"
    assert DeadlinePassed("x").code == "DEADLINE_EXCEEDED"


def test_payload_at_the_limit_is_accepted() -> None:
    admit(with_(lambda s: setattr(s, "payload", b"x" * 1024)), CFG, PIPELINES, NOW_MS)


def test_defaults_are_filled_in() -> None:
    admitted = admit(with_(lambda s: s.ClearField("task_id")), CFG, PIPELINES, NOW_MS)
    assert len(admitted.spec.task_id) == 32
    bare = with_(lambda s: s.ClearField("task_type"))  # pipeline and model are enough
    assert admit(bare, CFG, PIPELINES, NOW_MS).spec.task_type == pb.TASK_TYPE_CUSTOM
    assert admitted.spec.queue == "normal"
    assert admitted.spec.gpu_count == 1
    assert admitted.deadline_ms == NOW_MS + 60_000


def test_deadlines_are_clamped_to_the_maximum() -> None:
    far = with_(lambda s: s.timeout.FromSeconds(10 * 86400))
    assert admit(far, CFG, PIPELINES, NOW_MS).deadline_ms == NOW_MS + 3_600_000
    near = with_(lambda s: s.deadline.FromMilliseconds(NOW_MS + 1500))
    assert admit(near, CFG, PIPELINES, NOW_MS).deadline_ms == NOW_MS + 1500


def test_admit_does_not_change_the_callers_spec() -> None:
    spec = with_(lambda s: s.ClearField("queue"))
    admit(spec, CFG, PIPELINES, NOW_MS)
    assert spec.queue == ""


def test_digest_ignores_the_deadline_but_not_the_work() -> None:
    base = valid()
    retried = with_(lambda s: s.timeout.FromSeconds(30))
    other = with_(lambda s: s.params.update(seconds="2"))
    assert spec_digest(base) == spec_digest(retried)
    assert spec_digest(base) != spec_digest(other)


def test_a_client_sees_a_stored_result_by_name_never_by_path() -> None:
    status = pb.TaskStatus(task_id="t1")
    status.result.uri = "/var/lib/gpumesh/results/ab/cdef"
    status.result.media_type = "image/png"
    seen = public(status)
    assert seen.result.uri == "mesh:tasks/t1/result" and seen.result.media_type == "image/png"


@pytest.mark.parametrize(
    ("token", "point"),
    [("", ("", 0)), ("west:12", ("west", 12)), ("west:9223372036854775807", ("west", 2**63 - 1))],
)
def test_a_resume_token_names_a_dc_and_a_revision(token: str, point: tuple[str, int]) -> None:
    assert resume_point(token) == point


@pytest.mark.parametrize("token", ["west:" + "9" * 23, "west:", "west:-1", "x" * 200, "a:1:2"])
def test_a_resume_token_the_mesh_never_issued_is_invalid(token: str) -> None:
    with pytest.raises(InvalidTask, match="resume_token"):
        resume_point(token)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("image/png", True),
        ("text/plain; charset=utf-8", True),
        ("text/plain\r\nX-Injected: 1", False),
        ("text/plain\n", False),
        ("noslash", False),
        ("a/" + "b" * 300, False),
    ],
)
def test_a_media_type_is_checked_before_it_becomes_a_header(text: str, ok: bool) -> None:
    assert media_type_ok(text) is ok
    assert media_type(text) == (text if ok else "application/octet-stream")


def test_results_default_to_the_agents_own_state_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/srv/state")
    assert state_home() == Path("/srv/state/gpumesh")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert not str(state_home()).startswith("/tmp")


@pytest.mark.parametrize("waited_s", [-1.0, float("nan"), float("inf"), MAX_WAITED_S * 2])
def test_an_offer_carries_a_wait_only_of_a_queue_that_could_be(waited_s: float) -> None:
    """The wait an offer says its task had decides where it queues: a forged one would
    put it ahead of every task of its tenant, so it is bounded like every field."""
    spec = admit(valid(), CFG, PIPELINES, NOW_MS).spec
    envelope = peer_pb2.Envelope(spec=spec, path=["w1"], hops=1, attempt=1, waited_s=2.5)
    check_offer(envelope, CFG, PIPELINES, NOW_MS)
    envelope.waited_s = waited_s
    with pytest.raises(InvalidTask, match="waited_s"):
        check_offer(envelope, CFG, PIPELINES, NOW_MS)
