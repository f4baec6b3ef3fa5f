"""A weighted consistent-hash ring: nodes own arcs in proportion to their weight.

It knows nothing of agents, loads or forwarding (as ringpop's ``hashring``): it maps a key
to the nodes met walking clockwise from the key's point. A node gets
``round(weight * vnodes_per_weight)`` points (at least one), so an H100 agent owns about
three times the keys of an A40 one. Adding or removing a node moves only the keys of the
arcs it gains or loses, about ``1/N`` of them.

A node's points depend on its name alone, so the ring changes in place: ``add`` and
``remove`` touch that node's points only, never the fleet's. A DC of 10,000 agents has 1.6
million points; a join or a leave costs ~160 insertions into a sorted list of blocks (the
layout of ``sortedcontainers``, kept here so that a walk reads the blocks directly: a
decision walks a few points, and must cost microseconds). Each point is one integer (the
point, then the node's index in its low bits).
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping

VNODES_PER_WEIGHT = 160
_POINTS_PER_DIGEST = 8
_UNPACK = struct.Struct(">8Q").unpack
_BLOCK = 1000  # a block splits at twice this: an insertion moves at most ~2,000 pointers


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


class SortedInts:
    """64-bit integers in ascending order, each with a 32-bit tag, in blocks of flat
    arrays: insertion and removal in O(log n) plus a block's length, iteration from any
    value without copying. Flat arrays, not lists of ints: 12 bytes a point, read in
    order from memory (a walk at 10,000 agents is otherwise slowed by cache misses)."""

    def __init__(self, pairs: Iterable[tuple[int, int]] = (), block: int = _BLOCK) -> None:
        ordered = sorted(pairs)
        self._fill(array("Q", [v for v, _ in ordered]), array("I", [t for _, t in ordered]), block)

    @classmethod
    def of(cls, values: array[int], tags: array[int], block: int = _BLOCK) -> SortedInts:
        """Values with their tags, sorted by value then tag: one sort of plain integers
        (the value above the tag), the fastest a fleet's 1.6 million points go in order."""
        ordered = sorted([v << 32 | t for v, t in zip(values, tags, strict=True)])
        made = cls.__new__(cls)
        made._fill(
            array("Q", [o >> 32 for o in ordered]),
            array("I", [o & 0xFFFFFFFF for o in ordered]),
            block,
        )
        return made

    def _fill(self, values: array[int], tags: array[int], block: int) -> None:
        self._block = block
        self.blocks = [values[i : i + block] for i in range(0, len(values), block)]
        self.tags = [tags[i : i + block] for i in range(0, len(tags), block)]
        self.maxes = [b[-1] for b in self.blocks]
        self._len = len(values)

    def __len__(self) -> int:
        return self._len

    def add(self, value: int, tag: int) -> None:
        """Insert ``value`` with ``tag`` (equal values in the order of their tags)."""
        self._len += 1
        if not self.blocks:
            self.blocks, self.tags, self.maxes = [array("Q", [value])], [array("I", [tag])], [value]
            return
        i = min(bisect.bisect_left(self.maxes, value), len(self.maxes) - 1)
        block, tags = self.blocks[i], self.tags[i]
        j = bisect.bisect_left(block, value)
        while j < len(block) and block[j] == value and tags[j] < tag:
            j += 1
        block.insert(j, value)
        tags.insert(j, tag)
        self.maxes[i] = block[-1]
        half = self._block
        if len(block) > 2 * half:
            self.blocks[i : i + 1] = [block[:half], block[half:]]
            self.tags[i : i + 1] = [tags[:half], tags[half:]]
            self.maxes[i : i + 1] = [block[half - 1], block[-1]]

    def remove(self, value: int, tag: int) -> None:
        i = bisect.bisect_left(self.maxes, value)
        while i < len(self.blocks):  # equal values may run on into the next block
            block, tags = self.blocks[i], self.tags[i]
            j = bisect.bisect_left(block, value)
            while j < len(block) and block[j] == value:
                if tags[j] == tag:
                    del block[j], tags[j]
                    self._len -= 1
                    if block:
                        self.maxes[i] = block[-1]
                    else:
                        del self.blocks[i], self.tags[i], self.maxes[i]
                    return
                j += 1
            if j < len(block):
                break
            i += 1
        raise KeyError(value)

    def start(self, value: int) -> tuple[int, int]:
        """Block and offset of the first integer >= ``value`` (wrapping to the first)."""
        i = bisect.bisect_left(self.maxes, value)
        if i == len(self.maxes):
            return 0, 0
        return i, bisect.bisect_left(self.blocks[i], value)

    def values(self) -> list[tuple[int, int]]:
        return [
            (v, t)
            for b, ts in zip(self.blocks, self.tags, strict=True)
            for v, t in zip(b, ts, strict=True)
        ]


class HashRing:
    def __init__(
        self, weights: Mapping[str, float] | None = None, vnodes_per_weight: int = VNODES_PER_WEIGHT
    ) -> None:
        self._vnodes = vnodes_per_weight
        self._names: list[str | None] = []  # index: name (None: a free index)
        self._index: dict[str, int] = {}
        self._weights: dict[str, float] = {}
        self._free: list[int] = []
        values, tags = array("Q"), array("I")
        for node in sorted(weights or {}):
            points = self._tags(node, (weights or {})[node])
            values.extend([p for p, _ in points])
            tags.extend(array("I", [points[0][1]]) * len(points))
        self._points = SortedInts.of(values, tags)  # one sort for a whole fleet

    @property
    def nodes(self) -> Collection[str]:
        return self._index.keys()

    def __len__(self) -> int:
        return len(self._index)

    def weight(self, node: str) -> float | None:
        return self._weights.get(node)

    def add(self, node: str, weight: float) -> None:
        """Put ``node`` on the ring with ``weight`` (moving it if it was there with another)."""
        if self._weights.get(node) == weight:
            return
        self.remove(node)
        for point, index in self._tags(node, weight):
            self._points.add(point, index)

    def remove(self, node: str) -> None:
        index = self._index.pop(node, None)
        if index is None:
            return
        weight = self._weights.pop(node)
        for point in _node_points(node, self._count(weight)):
            self._points.remove(point, index)
        self._names[index] = None
        self._free.append(index)

    def _count(self, weight: float) -> int:
        return max(1, round(weight * self._vnodes))

    def _tags(self, node: str, weight: float) -> list[tuple[int, int]]:
        """Give ``node`` an index and return its tagged points (not yet on the ring)."""
        if self._free:
            index = self._free.pop()
            self._names[index] = node
        else:
            index = len(self._names)
            self._names.append(node)
        self._index[node] = index
        self._weights[node] = weight
        return [(p, index) for p in _node_points(node, self._count(weight))]

    def walk(self, point: int, among: Collection[str] | None = None) -> Iterator[str]:
        """Each node once (each of ``among`` only, if given), clockwise from ``point``.

        Walking the whole ring among some nodes meets them in the order a ring of just
        those nodes would: a node's points are its own, whoever else is on the ring."""
        blocks, names = self._points.tags, self._names
        if not blocks:
            return
        b, j = self._points.start(point)
        want = len(self._index) if among is None else len(among)
        seen: set[int] = set()
        for _ in range(len(blocks) + 1):  # from the start, round, back to the start
            block = blocks[b]
            for k in range(j, len(block)):
                index = block[k]
                if index in seen:
                    continue
                seen.add(index)
                name = names[index]
                if among is None or name in among:
                    yield name  # type: ignore[misc]
                    want -= 1
                    if not want:
                        return
            b, j = (b + 1) % len(blocks), 0

    def owner(self, point: int) -> str | None:
        return next(self.walk(point), None)
