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


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, MeshError):
        return grpc.StatusCode[exc.code], str(exc)
    if isinstance(exc, ETCD_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, f"etcd unavailable: {exc}"
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"
