"""How much of a DC's work has gone to other DCs lately: the cap on overflow. Pure.

Each agent counts its own recent placements (a sliding window of the last ``window``
decisions; before there are that many, the missing ones count as local), so a DC in
trouble cannot push more than ``max_share`` of its traffic onto its neighbours and drag
them down with it; beyond that, tasks wait or are refused.
"""

from __future__ import annotations

from collections import deque


class SpillShare:
    def __init__(self, max_share: float = 0.5, window: int = 200) -> None:
        self.max_share = max_share
        self._window = window
        self._recent: deque[bool] = deque(maxlen=window)
        self._spilled = 0

    def record(self, spilled: bool) -> None:
        if len(self._recent) == self._window:
            self._spilled -= self._recent[0]
        self._recent.append(spilled)
        self._spilled += spilled

    @property
    def share(self) -> float:
        return self._spilled / (self._window)

    def allowed(self) -> bool:
        """Whether one more task may go to another DC without passing the cap."""
        return (self._spilled + 1) / (self._window) <= self.max_share
