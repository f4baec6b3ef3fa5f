"""Runs an operator-declared program on the task's GPUs, as a subprocess.

Users name a command (``params["command"]``); its argv comes from the agent's config, so
a user can never choose what runs. The payload goes to stdin (from an unlinked temporary
file, not a pipe: uvloop can report a fresh stdin pipe as closed under load, and a file
also lets the program seek) and stdout, read to its end, is the result.
``CUDA_VISIBLE_DEVICES`` holds the slot's GPU indexes, so the program sees exactly the
GPUs it was given. Its environment is that and the variables ``command_env`` names, not
the agent's own (which may hold secrets: the gossip keys, a token). A stderr line
``PROGRESS step/total message`` reports progress. The exit code gives the state; on
cancel or deadline the whole process group is killed, and should the agent itself die
(SIGKILL, OOM), the kernel kills the program with it, so a dead agent leaves no job
holding its GPU while the task runs again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import tempfile
from collections.abc import Callable
from typing import IO

from mesh.config import AgentConfig
from mesh.core.jobs import Output
from mesh.errors import PipelineError
from mesh.pipelines import RunContext

PROGRESS_LINE = re.compile(rb"^PROGRESS (\d+)/(\d+) ?(.*)$")
STDERR_TAIL = 2048


class CommandPipeline:
    name = "command"

    def __init__(self, cfg: AgentConfig) -> None:
        self._commands = cfg.commands
        self._max_output = cfg.max_payload_bytes
        self._passed = cfg.command_env

    async def run(self, ctx: RunContext) -> Output:
        name = ctx.spec.params.get("command", "")
        argv = self._commands.get(name)
        if argv is None:
            raise PipelineError(
                f"unknown command {name!r}; this agent offers {sorted(self._commands)}",
                "INVALID_ARGUMENT",
            )
        env = {
            **{name: os.environ[name] for name in self._passed if name in os.environ},
            "CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in ctx.gpus),
            "MESH_TASK_ID": ctx.task_id,
            "MESH_ATTEMPT": str(ctx.attempt),
            "MESH_MODEL": ctx.spec.model,
        }
        with tempfile.TemporaryFile() as stdin:
            await asyncio.to_thread(_fill, stdin, ctx.spec.payload)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=stdin,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group: we can kill its children too
                preexec_fn=_die_with(os.getpid()),
            )
        try:
            stdout, stderr_tail = await asyncio.gather(
                self._read_output(proc), self._watch_stderr(proc, ctx)
            )
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if code != 0:
            tail = stderr_tail.decode(errors="replace").strip()
            raise PipelineError(f"command {name!r} exited with {code}: {tail}", "ABORTED")
        return Output(stdout, ctx.spec.params.get("media_type", "application/octet-stream"))

    async def _read_output(self, proc: asyncio.subprocess.Process) -> bytes:
        assert proc.stdout is not None
        out = bytearray()
        while chunk := await proc.stdout.read(64 * 1024):
            out += chunk
            if len(out) > self._max_output:
                raise PipelineError(
                    "command output exceeds max_payload_bytes", "RESOURCE_EXHAUSTED"
                )
        return bytes(out)

    async def _watch_stderr(self, proc: asyncio.subprocess.Process, ctx: RunContext) -> bytes:
        assert proc.stderr is not None
        tail = b""
        async for line in proc.stderr:
            match = PROGRESS_LINE.match(line.rstrip())
            if match:
                ctx.progress(int(match[1]), int(match[2]), match[3].decode(errors="replace"))
            else:
                tail = (tail + line)[-STDERR_TAIL:]
        return tail


def _fill(file: IO[bytes], payload: bytes) -> None:
    file.write(payload)
    file.flush()
    file.seek(0)


PR_SET_PDEATHSIG = 1


def _die_with(agent_pid: int) -> Callable[[], None]:
    """Runs in the child before exec: ask the kernel for SIGKILL when the agent dies."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arrange() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != agent_pid:  # the agent died before the request took hold
            os._exit(1)

    return arrange
