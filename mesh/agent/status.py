"""What status a failed call gets, for gRPC and HTTP alike.

``MeshError`` subclasses carry their status code (``mesh.errors``); etcd trouble that
escapes as an aetcd error is UNAVAILABLE; anything else is a bug, logged with its
traceback and answered INTERNAL without details, never a crashed agent.
"""

from __future__ import annotations

import logging

import grpc

from mesh.errors import MeshError
from mesh.store.etcd import ETCD_ERRORS

log = logging.getLogger(__name__)


MAX_DETAIL = 1024  # characters of an error a caller gets back: a request may be huge


def detail(exc: BaseException) -> str:
    """What an error tells its caller, capped: a denial that echoes a request's 1 MB user
    id would break the caller's metadata limit (and the log line) instead."""
    text = str(exc)
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, MeshError):
        return grpc.StatusCode[exc.code], detail(exc)
    if isinstance(exc, ETCD_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, f"etcd unavailable: {detail(exc)}"
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"
