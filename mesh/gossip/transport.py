"""The UDP socket and the asyncio loop around a ``Gossiper``: the only I/O in gossip.

Every datagram that fails a check is dropped and counted by reason
(``gpumesh_gossip_dropped_total{reason=...}``); nothing a peer sends can raise out of
here. ``drop_rate`` discards that share of outgoing datagrams, seeded: the fault hook the
loss tests use on real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from mesh import metrics
from mesh.core import clock
from mesh.errors import BadPacket
from mesh.gossip.protocol import Datagram, Gossiper

log = logging.getLogger(__name__)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, node: GossipNode) -> None:
        self.node = node

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.node.received(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip socket error: %s", exc)


class GossipNode:
    def __init__(
        self,
        gossiper: Gossiper,
        listen: str,
        on_stale: Callable[[list[str]], None],
        drop_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.gossiper = gossiper
        self._listen = listen
        self._on_stale = on_stale
        self._drop_rate = drop_rate
        self._rng = random.Random(seed)
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> str:
        """Bind the socket; return the address it listens on."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=_address(self._listen)
        )
        host, port = self._transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    async def run(self) -> None:
        """Gossip rounds forever; cancel to stop."""
        loop = asyncio.get_running_loop()
        while True:
            datagrams, stale = self.gossiper.tick(loop.time(), _now_ms())
            self._send(datagrams)
            if stale:
                self._on_stale(stale)
            await asyncio.sleep(self.gossiper.config.interval_s)

    def received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            replies = self.gossiper.receive(data, loop.time(), _now_ms())
        except BadPacket as exc:
            metrics.GOSSIP_DROPPED.labels(exc.reason).inc()
            return
        except Exception:  # a bug must not take the agent down with it
            log.exception("gossip datagram handling failed")
            metrics.GOSSIP_DROPPED.labels("internal").inc()
            return
        metrics.GOSSIP_RECEIVED.inc()
        self._send(replies)

    def _send(self, datagrams: list[Datagram]) -> None:
        if self._transport is None:
            return
        for address, data in datagrams:
            if self._drop_rate and self._rng.random() < self._drop_rate:
                metrics.GOSSIP_DROPPED.labels("injected loss").inc()
                continue
            try:
                self._transport.sendto(data, _address(address))
            except (OSError, ValueError) as exc:
                log.debug("gossip to %s failed: %s", address, exc)
            metrics.GOSSIP_SENT_BYTES.inc(len(data))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _now_ms() -> int:
    return clock.now_ms()
