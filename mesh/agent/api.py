"""What an agent offers the outside world: three narrow facades, one per service, and
the checks they share.

Each facade method takes and returns the API's protobuf messages, so an edge (the gRPC
servicers, the HTTP gateway) only translates transport to message and ``MeshError`` to
status: it never reaches into the agent's parts. Each facade is given only the parts it
answers from (``mesh.agent.compose`` builds them): ``TaskApi`` (``taskapi``) for users'
tasks, ``AgentApi`` (``agentapi``) for operators, ``PeerApi`` (``peerapi``) for agents;
``Apis`` (``apis``) hands the three to the edges.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine
from typing import Any, TypeVar

from mesh.core import classes
from mesh.core.access import ANYONE, OPERATOR, Grant, Identity, PermissionDenied
from mesh.errors import Unavailable
from mesh.v1 import tasks_pb2 as pb

T = TypeVar("T")


class ToTheEnd:
    """Runs work to its end even if the caller goes away meanwhile.

    gRPC cancels a handler whose client disconnects or times out; a Submit or an Offer
    cancelled between recording a task and placing it would leave a record that nobody
    places. The caller still gets the answer if it is still there.
    """

    def __init__(self) -> None:
        self._unfinished: set[asyncio.Task[Any]] = set()

    def __call__(self, work: Coroutine[Any, Any, T]) -> Awaitable[T]:
        task = asyncio.ensure_future(work)
        self._unfinished.add(task)
        task.add_done_callback(self._finished)
        return asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._unfinished.discard(task)
        if not task.cancelled():
            task.exception()  # seen: nobody may be left to await it


MAX_REASON = 1024
MAX_TOKEN = 128
MAX_AFFINITY = 256
MAX_GPUS = 64
MAX_SPLIT_USERS = 1000
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")


async def until_set(items: AsyncGenerator[T], leaving: asyncio.Event) -> AsyncIterator[T]:
    """``items`` until ``leaving`` is set, then ``Unavailable``: a stream on an agent
    that lets go of etcd ends with a status its client resumes from, not a broken read."""
    waiting = asyncio.ensure_future(leaving.wait())
    following: asyncio.Future[T] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(items))
            await asyncio.wait((following, waiting), return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():  # whatever the read gave: etcd may be gone under it
                raise Unavailable("this agent is leaving: watch again elsewhere from the token")
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:  # also when the caller went away: the read under way ends before the stream
        waiting.cancel()
        if following is not None and not following.done():
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        await items.aclose()


def owner_of(declared: pb.User, identity: Identity) -> pb.User:
    """Whose task this is: the caller's, never what the request says. A request may name
    the caller (and one of its groups); naming anyone else is refused."""
    if identity is ANYONE:
        return declared
    if declared.id and declared.id != identity.name:
        raise PermissionDenied(f"{identity} may not submit as {declared.id!r}")
    if declared.group and declared.group not in identity.groups:
        raise PermissionDenied(f"{identity} is not in group {declared.group!r}")
    if declared.role and declared.role not in identity.roles:
        raise PermissionDenied(f"{identity} does not hold role {declared.role!r}")
    group = declared.group or (identity.groups[0] if identity.groups else "")
    return pb.User(id=identity.name, group=group, role=declared.role)


def may_ask_online(spec: pb.TaskSpec, identity: Identity) -> None:
    """Online work is guaranteed GPUs and preempts batch: asking for it for a task type
    that is batch by default takes an operator."""
    if spec.task_class != pb.TASK_CLASS_ONLINE or identity is ANYONE:
        return
    default = pb.TaskSpec(task_type=spec.task_type)
    if classes.task_class(default) != classes.ONLINE and OPERATOR not in identity.held:
        raise PermissionDenied(
            f"{identity} may not run a {pb.TaskType.Name(spec.task_type)} task as online "
            "work (an operator may)"
        )


def forwards(grant: Grant) -> bool:
    """Whether a call about a task this DC has no record of goes on to the DC that has
    it: for users, yes; an agent asking is itself forwarding, and gets this DC's answer."""
    return grant.identity.kind != "agent"


def may_see(status: pb.TaskStatus, grant: Grant) -> pb.TaskStatus:
    if not grant.all_tasks and status.spec.user.id != grant.identity.name:
        raise PermissionDenied(f"{grant.identity} may act only on its own tasks")
    return status


def speaks_for(grant: Grant, dc: str, what: str) -> None:
    """An agent speaks for its own DC only."""
    identity = grant.identity
    if identity is not ANYONE and identity.dc != dc:
        raise PermissionDenied(f"{identity} may not send {what} for DC {dc!r}")
