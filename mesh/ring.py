"""A weighted consistent-hash ring: nodes own arcs in proportion to their weight.

It knows nothing of agents, loads or forwarding (as ringpop's ``hashring``): it maps a key
to the nodes met walking clockwise from the key's point. A node gets
``round(weight * vnodes_per_weight)`` points (at least one), so an H100 agent owns about
three times the keys of an A40 one. Adding or removing a node moves only the keys of the
arcs it gains or loses, about ``1/N`` of them.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Mapping

VNODES_PER_WEIGHT = 160


def key_point(key: str) -> int:
    """A stable 64-bit point for ``key``: blake2b, so every agent and every run agree."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(
        self, weights: Mapping[str, float], vnodes_per_weight: int = VNODES_PER_WEIGHT
    ) -> None:
        points: list[tuple[int, str]] = []
        for node, weight in weights.items():
            count = max(1, round(weight * vnodes_per_weight))
            points.extend((key_point(f"{node}#{i}"), node) for i in range(count))
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [n for _, n in points]
        self.nodes = frozenset(weights)

    def __len__(self) -> int:
        return len(self.nodes)

    def walk(self, point: int) -> Iterator[str]:
        """Each node once, in clockwise order from ``point``."""
        owners = self._owners
        total = len(owners)
        if not total:
            return
        start = bisect.bisect_left(self._points, point)
        seen: set[str] = set()
        want = len(self.nodes)
        for i in range(start, start + total):
            node = owners[i % total] if i >= total else owners[i]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == want:
                    return

    def owner(self, point: int) -> str | None:
        return next(self.walk(point), None)
