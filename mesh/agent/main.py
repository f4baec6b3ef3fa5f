"""``mesh-agent``: configuration, event loop and signals around one ``Server``.

The first SIGTERM or SIGINT drains gracefully (``drain_grace_s``); a second one exits at
once. A bad configuration prints one line per field and exits 2 before any socket opens.
"""

from __future__ import annotations

import os

# Before grpc is imported: its fork handlers run in every child the command pipeline
# spawns while gRPC threads are busy, and such a child can die before it execs (SIGSEGV).
# The agent never forks to run Python, so it needs no fork support.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import logging
import signal
import sys

from mesh import logs, metrics, tracing
from mesh.agent.notify import notify
from mesh.config import load_agent_config
from mesh.errors import ConfigError, MeshError

log = logging.getLogger("mesh.agent.agent")

EXIT_CONFIG = 2
EXIT_FAILED = 1


async def serve(argv: list[str]) -> int:
    try:
        cfg = load_agent_config(argv)
    except ConfigError as exc:
        print(f"mesh-agent: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level, agent=cfg.agent_id, dc=cfg.dc)
    spans = tracing.setup(cfg.agent_id, cfg.dc, cfg.span_dir, cfg.trace_sample_ratio)
    # Imported after logging is set up: building the agent probes NVML and logs about it.
    from mesh.agent.agent import Agent
    from mesh.agent.service import Server

    try:
        server = Server(Agent(cfg))
    except ConfigError as exc:
        print(f"mesh-agent: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.metrics_listen:
        server.agent.parts.membership.metrics_url = metrics.serve(cfg.metrics_listen)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second signal: exiting now")
            os._exit(EXIT_FAILED)
        log.info("signal %s: draining", signal.Signals(signum).name)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        try:
            await server.start()
        except MeshError as exc:
            log.error("cannot start: %s", exc)
            await server.stop(0)
            return EXIT_FAILED
        notify(READY="1", STATUS=f"serving as {cfg.agent_id} of {cfg.dc}")
        await stopping.wait()
        notify(STOPPING="1", STATUS=f"draining: running tasks get {cfg.drain_grace_s:g} s")
        await server.stop(cfg.drain_grace_s)
        log.info("stopped")
        return 0
    finally:
        for provider in spans:
            provider.shutdown()  # the last spans reach their file or collector
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        sys.exit(asyncio.run(serve(sys.argv[1:])))
    sys.exit(uvloop.run(serve(sys.argv[1:])))


if __name__ == "__main__":
    main()
