"""Wall-clock time as the mesh records it: milliseconds since the epoch, and protobuf
timestamps. The only clock the records and the backlog keys use; decisions that must be
replayed take the time as an argument instead of calling these."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp


def now_ms() -> int:
    return int(time.time() * 1000)


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts
