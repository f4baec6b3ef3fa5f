"""aetcd's watcher, with each watch matched to the request that created it.

aetcd 1.0 keeps one watch stream per client and takes etcd's next "created" answer to be
the answer to its one pending create. A create whose caller gave up (a timeout, a
cancelled request: routine when thousands of clients follow their tasks) leaves its
answer in flight; the next create then takes that answer, and with it another key's
events, while its own watch is cancelled as a leftover. A watch on one task's record
silently follows another's, and its client waits forever.

etcd (3.4 and later) lets the client choose each watch's id. Here every create carries a
fresh id, answers are matched by it, answers to abandoned creates are cancelled, and
creates no longer wait for each other. A create etcd refuses (no permission, say) is
answered with id -1; etcd answers the creates of one stream in the order they were sent,
so such an answer belongs to the oldest create not yet answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import aetcd.exceptions
import aetcd.watcher
from aetcd.watcher import WatcherCallback


class KeyedWatcher(aetcd.watcher.Watcher):
    def __init__(self, watchstub: Any, timeout: float | None = None, metadata: Any = None):
        super().__init__(watchstub, timeout=timeout, metadata=metadata)
        self._ids = itertools.count(1)  # never reused on this client, whichever stream
        self._creating: dict[int, tuple[WatcherCallback, asyncio.Future[None]]] = {}
        self._unanswered: deque[int] = deque()  # ids of the creates sent, oldest first

    async def add_callback(
        self,
        key: bytes,
        callback: Callable[..., Any],
        range_end: bytes | None = None,
        start_revision: int | None = None,
        progress_notify: bool = False,
        kind: Any = None,
        prev_kv: bool = False,
        watch_id: int | None = None,
        fragment: bool = False,
    ) -> WatcherCallback:
        """Create a watch and wait for etcd to confirm it (``WatchTimeoutError`` after the
        client's timeout). ``watch_id`` is ignored: the ids are this watcher's to pick."""
        watcher_callback = WatcherCallback(callback)
        watcher_callback.prev_kv = prev_kv
        created: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request = self._build_watch_create_request(
            key,
            range_end=range_end,
            start_revision=start_revision,
            progress_notify=progress_notify,
            kind=kind,
            prev_kv=prev_kv,
        )
        request.create_request.watch_id = wid = next(self._ids)
        request.create_request.fragment = fragment
        async with self._lock:
            await self.setup()
            self._creating[wid] = (watcher_callback, created)
            self._unanswered.append(wid)
            await self._request_queue.put(request)
        try:
            async with asyncio.timeout(self._timeout):
                await created
        except TimeoutError:
            raise aetcd.exceptions.WatchTimeoutError from None
        finally:
            self._creating.pop(wid, None)  # its answer, if it comes, is cancelled
        return watcher_callback

    async def _handle_response(self, response: Any) -> None:
        if response.created:
            async with self._lock:
                wid = self._answered(response.watch_id)
                creating = self._creating.pop(wid, None)
                # Abandoned by its caller: gone, or cancelled while its caller had yet to
                # run the line that forgets it.
                if creating is None or creating[1].done():
                    if not response.canceled:
                        await self._enqueue_watch_cancel(watch_id=response.watch_id)
                    return
                watcher_callback, created = creating
                if response.compact_revision:
                    created.set_exception(
                        aetcd.exceptions.RevisionCompactedError(response.compact_revision)
                    )
                    return
                if response.canceled:
                    created.set_exception(
                        aetcd.exceptions.ClientError(
                            f"etcd refused the watch: {response.cancel_reason}"
                        )
                    )
                    return
                watcher_callback.watch_id = response.watch_id
                self._callbacks[response.watch_id] = watcher_callback
                created.set_result(None)
            return  # etcd sends a watch's events after, never with, its "created" answer
        await super()._handle_response(response)

    def _answered(self, watch_id: int) -> int:
        """The id of the create that a "created" answer naming ``watch_id`` answers."""
        if watch_id < 0:
            return self._unanswered.popleft() if self._unanswered else watch_id
        with contextlib.suppress(ValueError):
            self._unanswered.remove(watch_id)
        return watch_id

    async def _terminate_stream(self, error: Exception | None) -> None:
        async with self._lock:
            creating, self._creating = self._creating, {}
            self._unanswered.clear()
        for _, created in creating.values():
            if not created.done():
                created.set_exception(error or aetcd.exceptions.ClientError("watcher shut down"))
        await super()._terminate_stream(error)
