"""The ``command`` pipeline with real subprocesses: GPUs, stdin/stdout, exit codes, kills."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from support import config, eventually

from mesh.errors import PipelineError
from mesh.gpus import parse_fake
from mesh.pipelines import Models, RunContext
from mesh.pipelines.command import CommandPipeline
from mesh.v1 import tasks_pb2 as pb

COMMANDS = {
    "env": ["sh", "-c", 'printf "%s|%s|%s" "$CUDA_VISIBLE_DEVICES" "$MESH_TASK_ID" "$MESH_MODEL"'],
    "secrets": ["sh", "-c", 'printf "%s|%s" "${MESH_GOSSIP_KEYS:-none}" "${PATH:+path}"'],
    "upper": ["tr", "a-z", "A-Z"],
    "steps": ["sh", "-c", 'for i in 1 2 3; do echo "PROGRESS $i/3 step $i" >&2; done; echo ok'],
    "fail": ["sh", "-c", "echo 'model file missing' >&2; exit 3"],
    "hang": ["sh", "-c", 'sleep 300 & echo "PROGRESS 0/1 $!" >&2; wait'],
    "flood": ["head", "-c", "4096", "/dev/zero"],
}


def context(command: str, payload: bytes = b"", gpus: str = "1xA100-80GB,1xH100-80GB"):
    seen: list[tuple[int, int, str]] = []
    spec = pb.TaskSpec(task_id="c-1", pipeline="command", model="m1", payload=payload)
    spec.params["command"] = command
    ctx = RunContext(
        task_id="c-1",
        attempt=1,
        spec=spec,
        gpus=tuple(parse_fake(gpus)),
        models=Models([], lambda: None),
        progress=lambda step, total, message: seen.append((step, total, message)),
    )
    return ctx, seen


@pytest.fixture
def pipeline() -> CommandPipeline:
    return CommandPipeline(
        config(commands=COMMANDS, max_payload_bytes=1024, inline_payload_bytes=512)
    )


async def test_program_sees_its_gpus_and_task(pipeline: CommandPipeline) -> None:
    ctx, _ = context("env")
    assert (await pipeline.run(ctx)).data == b"0,1|c-1|m1"


async def test_program_sees_no_secret_of_the_agent(
    pipeline: CommandPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the allow-listed variables pass: the agent's gossip keys stay with it."""
    monkeypatch.setenv("MESH_GOSSIP_KEYS", '["the-mesh-gossip-secret-key"]')
    ctx, _ = context("secrets")
    assert (await pipeline.run(ctx)).data == b"none|path"


async def test_payload_in_result_out(pipeline: CommandPipeline) -> None:
    ctx, _ = context("upper", payload=b"hello mesh " * 50)
    assert (await pipeline.run(ctx)).data == b"HELLO MESH " * 50


async def test_progress_lines_become_progress(pipeline: CommandPipeline) -> None:
    ctx, seen = context("steps")
    assert (await pipeline.run(ctx)).data == b"ok\n"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


async def test_exit_code_fails_the_task_with_stderr(pipeline: CommandPipeline) -> None:
    ctx, _ = context("fail")
    with pytest.raises(PipelineError, match="exited with 3: model file missing"):
        await pipeline.run(ctx)


async def test_users_cannot_name_a_program(pipeline: CommandPipeline) -> None:
    ctx, _ = context("/bin/rm")
    with pytest.raises(PipelineError, match="unknown command") as caught:
        await pipeline.run(ctx)
    assert caught.value.code == "INVALID_ARGUMENT"


async def test_output_over_the_limit_is_refused(pipeline: CommandPipeline) -> None:
    ctx, _ = context("flood")
    with pytest.raises(PipelineError, match="max_payload_bytes"):
        await pipeline.run(ctx)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def test_cancel_kills_the_whole_process_group(pipeline: CommandPipeline) -> None:
    ctx, seen = context("hang")
    run = asyncio.create_task(pipeline.run(ctx))
    await eventually(lambda: seen, what="the program to report its child")
    grandchild = int(seen[0][2])
    os.kill(grandchild, 0)  # alive while the task runs
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await eventually(lambda: _gone(grandchild), what="the grandchild to be killed")
