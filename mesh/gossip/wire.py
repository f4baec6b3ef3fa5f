"""Gossip datagrams: a versioned header, a msgpack body, an HMAC-SHA256 trailer. Pure.

``GM`` | wire version | kind | msgpack{from, incarnation, seq, ts, payload} | HMAC(32)

The MAC is made with the first key of the keyring and checked against every key, so a
key is rotated by deploying ``[new, old]`` everywhere, then ``[new]``. A datagram that is
too big, too short, not ours, unauthenticated, malformed or replayed raises ``BadPacket``
with the reason, which the transport counts and drops. msgpack is decoded with caps on
every length, and never into anything but plain lists, maps, strings and numbers.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import msgpack

from mesh.errors import BadPacket

MAGIC = b"GM"
WIRE_VERSION = 1
MAC_BYTES = 32
HEADER_BYTES = len(MAGIC) + 2
MAX_DATAGRAM = 1400  # fits one Ethernet frame with IP and UDP headers
REPLAY_WINDOW = 64  # sequence numbers remembered per sender
MAX_SKEW_MS = 30_000  # older or newer than this by the receiver's clock: dropped


class Kind(IntEnum):
    SYN = 1  # digest + sender's state + rumours
    ACK = 2  # states the SYN's sender lacks + what we lack from it
    DELTA = 3  # states asked for
    SUMMARY = 4  # other DCs' summaries, passed around the DC


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    sender: str
    incarnation: int
    seq: int
    ts_ms: int
    payload: dict[str, object]


@dataclass(frozen=True, slots=True)
class Keyring:
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys or any(len(k) < 16 for k in self.keys):
            raise ValueError("a gossip keyring needs at least one key of 16 bytes or more")

    def sign(self, data: bytes) -> bytes:
        return hmac.new(self.keys[0], data, hashlib.sha256).digest()

    def verify(self, data: bytes, mac: bytes) -> bool:
        return any(
            hmac.compare_digest(hmac.new(k, data, hashlib.sha256).digest(), mac) for k in self.keys
        )


def encode(keyring: Keyring, kind: Kind, sender: str, incarnation: int, seq: int,
           ts_ms: int, payload: dict[str, object]) -> bytes:  # fmt: skip
    body = msgpack.packb(
        {"f": sender, "i": incarnation, "s": seq, "t": ts_ms, "p": payload}, use_bin_type=True
    )
    signed = MAGIC + bytes([WIRE_VERSION, kind]) + body
    return signed + keyring.sign(signed)


def packed_size(value: object) -> int:
    """Bytes ``value`` takes in a frame's msgpack body."""
    return len(msgpack.packb(value, use_bin_type=True))


def body_size(payload: dict[str, object]) -> int:
    """Bytes ``payload`` takes in a frame, with the header and MAC (sender id at most 64)."""
    return HEADER_BYTES + MAC_BYTES + 96 + packed_size(payload)


def decode(keyring: Keyring, data: bytes, max_bytes: int = MAX_DATAGRAM) -> Frame:
    if len(data) > max_bytes:
        raise BadPacket("oversized")
    if len(data) < HEADER_BYTES + MAC_BYTES + 1:
        raise BadPacket("short")
    if data[:2] != MAGIC:
        raise BadPacket("not gossip")
    if data[2] != WIRE_VERSION:
        raise BadPacket("wire version")
    signed, mac = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not keyring.verify(signed, mac):
        raise BadPacket("bad mac")
    try:
        kind = Kind(data[3])
        body = msgpack.unpackb(
            signed[HEADER_BYTES:],
            raw=False,
            strict_map_key=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=1024,
            max_map_len=1024,
            max_ext_len=0,
        )
        frame = Frame(kind, body["f"], body["i"], body["s"], body["t"], body["p"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise BadPacket("malformed") from exc
    if not (isinstance(frame.sender, str) and isinstance(frame.payload, dict)) or not all(
        isinstance(n, int) and n >= 0 for n in (frame.incarnation, frame.seq, frame.ts_ms)
    ):
        raise BadPacket("malformed")
    return frame


@dataclass(slots=True)
class _Seen:
    highest: int
    window: int  # bit i set: highest - i was seen

    def accept(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.window = ((self.window << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = seq
            return
        offset = self.highest - seq
        if offset >= REPLAY_WINDOW or self.window >> offset & 1:
            raise BadPacket("replayed")
        self.window |= 1 << offset


KEPT_INCARNATIONS = 4  # windows kept per sender, newest incarnations first


@dataclass(slots=True)
class ReplayGuard:
    """Drops a datagram seen before, as IPsec does: the highest sequence number and a
    bitmap of the ones just below it, per sender and incarnation (a restarted sender
    starts a new one). A few incarnations are kept per sender, so one frame claiming a
    newer incarnation (a forged one, or a clock gone wrong) cannot make every frame of
    the sender's real incarnation look replayed; a frame older than ``MAX_SKEW_MS`` is
    dropped anyway, so an incarnation that fell out of the kept ones cannot be replayed."""

    _seen: dict[str, dict[int, _Seen]] = field(default_factory=dict)

    def accept(self, frame: Frame, now_ms: int) -> None:
        if abs(now_ms - frame.ts_ms) > MAX_SKEW_MS:
            raise BadPacket("stale")
        if frame.incarnation > now_ms + MAX_SKEW_MS:  # an incarnation is a start time
            raise BadPacket("incarnation from the future")
        kept = self._seen.setdefault(frame.sender, {})
        seen = kept.get(frame.incarnation)
        if seen is not None:
            seen.accept(frame.seq)
            return
        if len(kept) >= KEPT_INCARNATIONS:
            oldest = min(kept)
            if frame.incarnation < oldest:
                raise BadPacket("replayed")
            del kept[oldest]
        kept[frame.incarnation] = _Seen(frame.seq, 1)

    def forget(self, senders: Sequence[str]) -> None:
        for sender in senders:
            self._seen.pop(sender, None)
