"""This agent's GPU slots, one per GPU: which are free, which are lent, and whether the
agent takes new work.

The executor takes slots for its runs and gives them back; a split task's stage from
another agent borrows one for its length (``lend``), never queued, so a stage never
holds a GPU waiting for another. Both count in this agent's load, here and in gossip.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from mesh.agent.events import Signal
from mesh.errors import NoCapacity
from mesh.gpus import Gpu
from mesh.v1 import tasks_pb2 as pb


class GpuSlots:
    def __init__(self, gpus: Sequence[Gpu], changed: Callable[[], None] = lambda: None) -> None:
        """``changed``: the slots in use changed (the view and gossip follow)."""
        self.gpus = list(gpus)
        self.free = list(gpus)
        self.lent: Counter[str] = Counter()  # GPUs lent to other agents' stages, by class
        self.accepting = True  # False once the agent drains: no new work, no stage
        self.freed: Signal[[]] = Signal("freed")  # a slot came back: queued work may start
        self._changed = changed

    def __len__(self) -> int:
        return len(self.gpus)

    def fitting(self, spec: pb.TaskSpec) -> list[Gpu]:
        """The free GPUs with the memory ``spec`` asks for."""
        return [g for g in self.free if g.memory_mb >= spec.min_gpu_memory_mb]

    def big_enough(self, spec: pb.TaskSpec) -> int:
        """How many of all the GPUs have the memory ``spec`` asks for."""
        return sum(1 for g in self.gpus if g.memory_mb >= spec.min_gpu_memory_mb)

    def take(self, gpus: Sequence[Gpu]) -> None:
        """Take ``gpus`` for a run; its owner tells of the change once the run is in
        place (else the view would count the slots taken but not the run)."""
        for gpu in gpus:
            self.free.remove(gpu)

    def give_back(self, gpus: Sequence[Gpu]) -> None:
        self.free.extend(gpus)
        self.freed.emit()
        self._changed()

    def free_memory_mb(self) -> tuple[int, ...]:
        return tuple(g.memory_mb for g in self.free)

    @contextlib.contextmanager
    def lend(self, queue: str) -> Iterator[Gpu]:
        """A free GPU for one stage of a task of ``queue`` another agent runs split by
        layers: taken at once or refused (``NoCapacity``: the sender gives the layers to
        another agent). It goes around the queue: the stage's task already runs."""
        if not self.accepting or not self.free:
            raise NoCapacity("no free GPU here for a stage")
        gpu = max(self.free, key=lambda g: g.memory_mb)
        self.free.remove(gpu)
        self.lent[queue] += 1
        self._changed()
        try:
            yield gpu
        finally:
            self.lent[queue] -= 1
            self.give_back([gpu])
