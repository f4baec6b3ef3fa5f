"""The DCs of the mesh as this agent knows them: the applied topology's names, the other
DCs' last summaries, and this DC's own slots from the router's view.

One small holder, written by the parts that learn each fact (the view applies the
topology, the speaker mirrors the summaries) and read by the ones that need them (global
quota caps, overflow, addressing), so none of those reaches into the part that learns.
"""

from __future__ import annotations

from mesh.core.router import Router
from mesh.v1 import peer_pb2


class KnownDcs:
    def __init__(self, dc: str, router: Router) -> None:
        self.dc = dc
        self._router = router
        self.names: list[str] = []  # the applied topology's DCs (none before one is)
        self.heard: dict[str, peer_pb2.DcSummary] = {}  # the others, as last stored

    def __call__(self) -> list[str]:
        return self.names

    def summaries(self) -> dict[str, peer_pb2.DcSummary]:
        return self.heard

    def slots(self) -> dict[str, int]:
        """Every DC's GPU slots as this agent knows them, which global caps are split by:
        its own from its view of the DC, the others' from their last summary (a DC never
        heard from counts as alike to this one)."""
        own = self._router.totals().slots
        heard = {dc: summary.slots for dc, summary in self.heard.items()}
        return dict.fromkeys(self.names, own) | heard | {self.dc: own}

    def held_elsewhere(self, group: str) -> int:
        """GPUs ``group`` holds against its global cap in the other DCs, as their last
        summaries said."""
        return sum(s.global_held.get(group, 0) for dc, s in self.heard.items() if dc != self.dc)
