"""The public Python SDK: the mesh as its users see it, not one agent.

    from mesh.sdk import Client, Security

    security = Security.from_files("gpumesh", Path("ca.crt"), token=os.environ["MESH_TOKEN"])
    with Client(["10.0.2.17:50051", "10.0.2.18:50051"], security) as mesh:
        task = mesh.submit("sleep", "sdxl-1.0", params={"seconds": "2"})
        for event in task.watch():
            print(event.status.state, event.status.progress.step)
        print(task.result(timeout=60))

A producer of many tasks sends them over one stream, each answered as it is recorded and,
with ``follow``, again when it ends: ``for answer in mesh.submit_many(specs, follow=True)``.

``Client`` blocks; ``AsyncClient`` is the same for asyncio code. Both balance over the
DC's healthy agents, retry a Submit elsewhere with the same idempotency key when an agent
is gone, and resume a watch on another agent from the last event seen. Errors are typed,
one per status (``mesh.sdk.errors``). It may import the base modules and the core, never
an agent's parts.
"""

from mesh.channels import Security
from mesh.sdk.client import Answer, AsyncClient, Task
from mesh.sdk.errors import TaskCancelled, TaskFailed
from mesh.sdk.sync import Client, SyncTask

__all__ = [
    "Answer",
    "AsyncClient",
    "Client",
    "Security",
    "SyncTask",
    "Task",
    "TaskCancelled",
    "TaskFailed",
]
