"""``python -m bench hop [--calls N] [--json]``: what a forward hop costs, and what TLS adds.

In one run, sequential unary calls from one process to another on loopback:

- ``plaintext``: a bare grpc.aio server's health check, no TLS (the floor; no agent ever
  serves plaintext unless started ``--insecure``, which no benchmark does);
- ``tls``: the same server, server-authenticated TLS (an agent's API port);
- ``mtls``: the same server, mutual TLS (an agent's mTLS port);
- ``agent offer``: a real agent's ``PeerService.Offer`` over mTLS with an agent's
  certificate (identity from the certificate, the rule table, the offer's checks), refused
  at once as a loop so that no etcd write is timed: the hop itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench.localdc import one_dc
from mesh.channels import Security, open_channel
from mesh.core.clock import now_ms
from mesh.local.localmesh import free_port
from mesh.local.trust import LocalTrust
from mesh.v1 import peer_pb2, peer_pb2_grpc
from mesh.v1 import tasks_pb2 as pb

MAX_MESSAGE = 8 * 1024 * 1024


def _serve(port: int, mode: str, pki: str, ready: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    async def run() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        address = f"127.0.0.1:{port}"
        if mode == "plaintext":
            server.add_insecure_port(address)
        else:
            files = LocalTrust(Path(pki), "gpumesh").agent("bench", "dc")
            pair = (files.key.read_bytes(), files.cert.read_bytes())
            credentials = grpc.ssl_server_credentials(
                [pair], files.ca.read_bytes(), require_client_auth=mode == "mtls"
            )
            server.add_secure_port(address, credentials)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(run())


async def _timed(call: Callable[[], Awaitable[object]], calls: int) -> dict[str, float]:
    for _ in range(min(200, calls)):  # warm: connection, TLS session, code paths
        await call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1e6)
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_us": round(cuts[49], 1), "p99_us": round(cuts[98], 1)}


async def _raw(mode: str, trust: LocalTrust, calls: int) -> dict[str, float]:
    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(port, mode, str(trust.root), ready))
    server.start()
    try:
        ready.wait(30)
        files = trust.agent("client", "dc")
        security = (
            Security(trust.mesh, insecure=True)
            if mode == "plaintext"
            else Security.from_files(
                trust.mesh,
                files.ca,
                files.cert if mode == "mtls" else None,
                files.key if mode == "mtls" else None,
            )
        )
        async with open_channel(f"127.0.0.1:{port}", security, MAX_MESSAGE, "dc") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            return await _timed(lambda: check(health_pb2.HealthCheckRequest()), calls)
    finally:
        server.kill()
        server.join()


async def _agent_offer(address: str, trust: LocalTrust, calls: int) -> dict[str, float]:
    files = trust.agent("peer", "dc")
    agent = Security.from_files(trust.mesh, files.ca, files.cert, files.key)
    spec = pb.TaskSpec(
        task_id="hop", user=pb.User(id="bench"), task_type=pb.TASK_TYPE_CUSTOM,
        pipeline="echo", model="m", queue="normal", gpu_count=1,
    )  # fmt: skip
    envelope = peer_pb2.Envelope(
        spec=spec, path=["peer", "hop"], hops=1, attempt=1, deadline_unix_ms=now_ms() + 3_600_000
    )
    async with open_channel(address, agent, MAX_MESSAGE, "dc") as channel:
        offer = peer_pb2_grpc.PeerServiceStub(channel).Offer
        return await _timed(lambda: offer(envelope), calls)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench hop", description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trust = LocalTrust.create(Path(tempfile.mkdtemp(prefix="gpumesh-hop-")) / "pki", "gpumesh")
    result: dict[str, dict[str, float]] = {}
    for mode in ("plaintext", "tls", "mtls"):
        result[mode] = asyncio.run(_raw(mode, trust, args.calls))
    with one_dc("hop", [{"id": "hop", "fake_gpus": "1xA100-80GB"}], timeout_s=60) as mesh:
        assert mesh.trust is not None
        agent = next(s for s in mesh.started if s.kind == "agent")
        result["agent offer"] = asyncio.run(
            _agent_offer(agent.peer_address, mesh.trust, args.calls)
        )
    if args.json:
        print(json.dumps({"calls": args.calls, **result}))
        return
    print(f"{'hop':<14}{'p50 µs':>10}{'p99 µs':>10}")
    for name, figures in result.items():
        print(f"{name:<14}{figures['p50_us']:>10}{figures['p99_us']:>10}")
