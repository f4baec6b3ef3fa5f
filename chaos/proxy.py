"""A transparent TCP proxy that delays every chunk it relays: WAN latency without netem.

iptables REDIRECTs the connections between DCs to it; it reads each connection's
original destination (``SO_ORIGINAL_DST``), dials it, and relays both ways, holding each
chunk for the delay plus a uniform jitter. Order is kept per direction (a chunk never
overtakes the one before it), as TCP would keep it, so jitter stretches gaps without
reordering bytes. etcd's robustness tests put such proxies in front of members for the
same reason: the kernel here has no netem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
from pathlib import Path
from typing import IO

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the socket module does not export it
CHUNK = 64 * 1024


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class DelayProxy:
    def __init__(
        self, delay_s: float, jitter_s: float, rng: random.Random, log: IO[str] | None = None
    ) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self._rng = rng
        self._log = log  # one line per connection relayed: proof the fault was on the path

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        try:
            while chunk := await reader.read(CHUNK):
                due = max(due, loop.time() + self.delay_s + self._rng.uniform(0, self.jitter_s))
                await asyncio.sleep(due - loop.time())
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            host, port = original_destination(sock)
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        if self._log is not None:
            self._log.write(json.dumps({"to": f"{host}:{port}"}) + "\n")
            self._log.flush()
        await asyncio.gather(
            self._pump(reader, upstream_writer), self._pump(upstream_reader, writer)
        )


async def serve(port: int, delay_ms: float, jitter_ms: float, log: IO[str] | None) -> None:
    proxy = DelayProxy(delay_ms / 1000, jitter_ms / 1000, random.Random(), log)
    server = await asyncio.start_server(proxy.handle, "0.0.0.0", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--jitter-ms", type=float, default=10.0)
    parser.add_argument("--log", type=Path, help="append one JSON line per connection")
    args = parser.parse_args()
    with args.log.open("a") if args.log else contextlib.nullcontext() as log:
        asyncio.run(serve(args.port, args.delay_ms, args.jitter_ms, log))


if __name__ == "__main__":
    main()
