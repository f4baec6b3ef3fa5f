"""A weighted consistent-hash ring: nodes own arcs in proportion to their weight.

It knows nothing of agents, loads or forwarding (as ringpop's ``hashring``): it maps a key
to the nodes met walking clockwise from the key's point. A node gets
``round(weight * vnodes_per_weight)`` points (at least one), so an H100 agent owns about
three times the keys of an A40 one. Adding or removing a node moves only the keys of the
arcs it gains or loses, about ``1/N`` of them.

Points live in flat arrays, not lists of tuples: a ring of 10,000 agents has a few
million points, and tuples would cost memory and long garbage-collector pauses.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from array import array
from collections.abc import Iterator, Mapping

VNODES_PER_WEIGHT = 160
_POINTS_PER_DIGEST = 8
_UNPACK = struct.Struct(">8Q").unpack
_INDEX_BITS = 24  # up to 16 million nodes


def key_point(key: str) -> int:
    """A stable 64-bit point for ``key``: blake2b, so every agent and every run agree."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _node_points(node: str, count: int) -> list[int]:
    """``count`` points for ``node``, eight from each 64-byte digest."""
    points: list[int] = []
    for block in range((count + _POINTS_PER_DIGEST - 1) // _POINTS_PER_DIGEST):
        digest = hashlib.blake2b(f"{node}#{block}".encode(), digest_size=64).digest()
        points.extend(_UNPACK(digest))
    return points[:count]


class HashRing:
    def __init__(
        self, weights: Mapping[str, float], vnodes_per_weight: int = VNODES_PER_WEIGHT
    ) -> None:
        self._names = sorted(weights)
        tagged: list[int] = []
        for index, node in enumerate(self._names):
            count = max(1, round(weights[node] * vnodes_per_weight))
            tagged.extend(p << _INDEX_BITS | index for p in _node_points(node, count))
        tagged.sort()
        mask = (1 << _INDEX_BITS) - 1
        self._points = array("Q", (t >> _INDEX_BITS for t in tagged))
        self._owners = array("I", (t & mask for t in tagged))
        self.nodes = frozenset(weights)

    def __len__(self) -> int:
        return len(self.nodes)

    def walk(self, point: int) -> Iterator[str]:
        """Each node once, in clockwise order from ``point``."""
        owners, names = self._owners, self._names
        total = len(owners)
        if not total:
            return
        start = bisect.bisect_left(self._points, point)
        seen: set[int] = set()
        want = len(names)
        for i in range(start, start + total):
            index = owners[i - total] if i >= total else owners[i]
            if index not in seen:
                seen.add(index)
                yield names[index]
                if len(seen) == want:
                    return

    def owner(self, point: int) -> str | None:
        return next(self.walk(point), None)
