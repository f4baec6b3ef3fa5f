"""``Client``: the same mesh, for code that does not run an event loop (scripts,
notebooks). Its calls run on an event loop of its own, in a background thread; each
blocks until it is answered, and a watch is an ordinary iterator."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from mesh.channels import Security
from mesh.sdk.client import Answer, AsyncClient, Task
from mesh.v1 import tasks_pb2 as pb

T = TypeVar("T")
_DONE = object()


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """An async iterator of the loop, consumed from this thread."""
        handoff: queue.Queue[object] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in items:
                    handoff.put(item)
            except BaseException as exc:  # raised in the consumer's thread instead
                handoff.put(exc)
            finally:
                handoff.put(_DONE)

        asyncio.run_coroutine_threadsafe(pump(), self.loop)
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncTask:
    def __init__(self, loop: _Loop, task: Task) -> None:
        self._loop = loop
        self._task = task
        self.task_id = task.task_id

    @property
    def last(self) -> pb.TaskStatus | None:
        return self._task.last

    def status(self) -> pb.TaskStatus:
        return self._loop.run(self._task.status())

    def watch(self) -> Iterator[pb.TaskEvent]:
        return self._loop.iterate(self._task.watch())

    def wait(self, timeout: float | None = None) -> pb.TaskStatus:
        return self._loop.run(self._task.wait(timeout))

    def result(self, timeout: float | None = None) -> bytes:
        return self._loop.run(self._task.result(timeout))

    def cancel(self, reason: str = "") -> pb.TaskStatus:
        return self._loop.run(self._task.cancel(reason))

    def rerun(self, task_id: str = "") -> SyncTask:
        return SyncTask(self._loop, self._loop.run(self._task.rerun(task_id)))


class Client:
    """``AsyncClient``'s calls, blocking: the same arguments, the same errors."""

    def __init__(self, endpoints: Sequence[str], security: Security, **options: Any) -> None:
        self._loop = _Loop()
        self._client = AsyncClient(endpoints, security, **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run(self._client.close())
        self._loop.close()

    def submit(self, pipeline: str, model: str, **fields: Any) -> SyncTask:
        return SyncTask(self._loop, self._loop.run(self._client.submit(pipeline, model, **fields)))

    def submit_spec(self, spec: pb.TaskSpec) -> SyncTask:
        return SyncTask(self._loop, self._loop.run(self._client.submit_spec(spec)))

    def submit_many(
        self, specs: Iterable[pb.TaskSpec], *, follow: bool = False
    ) -> Iterator[Answer]:
        """``AsyncClient.submit_many``: one stream for many tasks, answered as they come."""
        return self._loop.iterate(self._client.submit_many(specs, follow=follow))

    def task(self, task_id: str) -> SyncTask:
        return SyncTask(self._loop, self._client.task(task_id))

    def agents(self) -> list[pb.AgentInfo]:
        return self._loop.run(self._client.agents())

    def list(
        self, *, state: int = 0, user: str = "", page_size: int = 0
    ) -> Iterator[pb.TaskStatus]:
        return self._loop.iterate(self._client.list(state=state, user=user, page_size=page_size))
