"""Running a finished task again: a new task with its spec and payload, linked to it.

The payload is in the old task's record (when it was small enough to be kept there), so
the new task is made where that record is: a DC that has no record of the task passes
the request on to the one that has (``mesh.agent.tasks.answering``), which builds the
new spec (``mesh.core.lifecycle.again``) and submits it as any Submit. The caller's
right to it (its own task, its queue, its class) is checked where it asked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mesh.agent.tasks import Reach, answering
from mesh.core.lifecycle import again
from mesh.v1 import tasks_pb2 as pb

Submit = Callable[[pb.TaskSpec], Awaitable[pb.SubmitResponse]]


class Reruns:
    def __init__(self, reach: Reach) -> None:
        self._reach = reach

    async def rerun(
        self, request: pb.RerunRequest, forward: bool, submit: Submit
    ) -> pb.SubmitResponse:
        """``submit`` records and places the new spec, here."""
        reach = self._reach
        found = await answering(reach.store, reach.addressing, request.task_id, forward)
        if isinstance(found, str):
            return await reach.remote.rerun(found, request)
        return await submit(again(found.record, request.new_task_id))
