"""Tasks: ``meshctl submit``, ``get``, ``list``, ``watch``, ``cancel`` and ``rerun``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn

from mesh.cli.common import (
    EndpointOpt,
    HomeOpt,
    Output,
    OutputOpt,
    as_dict,
    call,
    console,
    emit,
    fail,
    resolve_endpoint,
    status_table,
)
from mesh.client import MeshClient
from mesh.core.task import state_name
from mesh.local import localmesh
from mesh.v1 import tasks_pb2 as pb

app = typer.Typer()


def parse_params(params: list[str]) -> dict[str, str]:
    out = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--param {item!r}: expected KEY=VALUE", 2)
        out[key] = value
    return out


@app.command()
def submit(
    pipeline: Annotated[str, typer.Option(help="pipeline, e.g. sleep, echo, command")],
    model: Annotated[str, typer.Option(help="model name")],
    task_type: Annotated[
        str, typer.Option("--type", help="t2i, i2i, super_resolution, tts, llm or custom")
    ] = "custom",
    user: Annotated[str, typer.Option(help="user id; default: who the credentials name")] = "",
    queue: Annotated[str, typer.Option(help="queue class; empty: the default")] = "",
    param: Annotated[list[str], typer.Option("--param", "-p", help="KEY=VALUE")] = [],  # noqa: B006
    payload_file: Annotated[
        Path | None, typer.Option("--payload", exists=True, dir_okay=False, help="file to send")
    ] = None,
    task_id: Annotated[str, typer.Option("--id", help="client id (idempotent)")] = "",
    timeout: Annotated[float, typer.Option(help="task deadline in seconds; 0: default")] = 0,
    affinity: Annotated[str, typer.Option(help="affinity key")] = "",
    gpus: Annotated[int, typer.Option(help="GPU count")] = 1,
    wait: Annotated[bool, typer.Option(help="follow the task to its end")] = False,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Submit a task to any agent."""
    try:
        kind = pb.TaskType.Value(f"TASK_TYPE_{task_type.upper()}")
    except ValueError:
        raise fail(f"unknown --type {task_type!r}", 2) from None
    spec = pb.TaskSpec(
        task_id=task_id,
        user=pb.User(id=user),
        task_type=kind,
        pipeline=pipeline,
        model=model,
        queue=queue,
        params=parse_params(param),
        affinity_key=affinity,
        gpu_count=gpus,
        payload=payload_file.read_bytes() if payload_file else b"",
    )
    if timeout:
        spec.timeout.FromMilliseconds(int(timeout * 1000))
    address = resolve_endpoint(endpoint, home)
    reply = call(address, lambda c: c.submit(spec))
    if wait:
        follow(address, reply.status.task_id, output)
        return
    emit(as_dict(reply), output, lambda: status_table([reply.status]))


@app.command()
def get(
    task_id: str,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """A task's status, from any agent of its DC."""
    status = call(resolve_endpoint(endpoint, home), lambda c: c.get(task_id))
    emit(as_dict(status), output, lambda: status_table([status]))


@app.command("list")
def list_tasks(
    user: Annotated[str, typer.Option(help="only this user's tasks")] = "",
    state: Annotated[str, typer.Option(help="only tasks in this state")] = "",
    limit: Annotated[int, typer.Option(help="most tasks to show")] = 50,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Tasks of the endpoint's DC."""
    try:
        state_value = pb.TaskState.Value(f"TASK_STATE_{state.upper()}") if state else 0
    except ValueError:
        raise fail(f"unknown --state {state!r}", 2) from None
    reply = call(
        resolve_endpoint(endpoint, home),
        lambda c: c.list(user_id=user, state=state_value, limit=limit),
    )
    emit(as_dict(reply), output, lambda: status_table(list(reply.tasks)))


def follow(address: str, task_id: str, output: Output) -> None:
    async def run(client: MeshClient) -> pb.TaskStatus:
        last = None
        if output is not Output.table:
            async for event in client.watch(task_id):
                print(json.dumps(as_dict(event)), flush=True)
                last = event.status
            assert last is not None
            return last
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            console=console,
        ) as bar:
            row = bar.add_task(task_id, total=None)
            async for event in client.watch(task_id):
                last = event.status
                p = last.progress
                bar.update(
                    row,
                    description=f"{task_id} {state_name(last.state)} {last.agent}",
                    completed=p.step,
                    total=p.total or None,
                )
        assert last is not None
        return last

    status = call(address, run)
    if output is Output.table:
        console.print(status_table([status]))
    if status.state != pb.TASK_STATE_SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def watch(
    task_id: str,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Follow a task with a progress bar until it ends (exit 1 unless it succeeded)."""
    follow(resolve_endpoint(endpoint, home), task_id, output)


@app.command()
def cancel(
    task_id: str,
    reason: Annotated[str, typer.Option(help="recorded with the task")] = "",
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Cancel a task, from any agent of its DC."""
    status = call(resolve_endpoint(endpoint, home), lambda c: c.cancel(task_id, reason))
    emit(as_dict(status), output, lambda: status_table([status]))


@app.command()
def rerun(
    task_id: str,
    new_id: Annotated[
        str, typer.Option("--id", help="the new task's id (the rerun's idempotency key)")
    ] = "",
    wait: Annotated[bool, typer.Option(help="follow the new task to its end")] = False,
    endpoint: EndpointOpt = None,
    output: OutputOpt = Output.table,
    home: HomeOpt = localmesh.DEFAULT_HOME,
) -> None:
    """Run a finished task again: a new task with its spec and payload (its rerun_of names
    this one)."""
    address = resolve_endpoint(endpoint, home)
    reply = call(address, lambda c: c.rerun(task_id, new_id or uuid.uuid4().hex))
    if wait:
        follow(address, reply.status.task_id, output)
        return
    emit(as_dict(reply), output, lambda: status_table([reply.status]))


# -- routing ---------------------------------------------------------------------------------
