"""Which agent a call goes to: round robin over the DC's healthy agents. Pure.

The client refreshes the list from ``ListAgents`` (draining agents and those its view
suspects are left out); an agent that failed a call is skipped for ``cooldown_s``, and a
retry never goes back to an agent the same call already tried while another is left.
Time is passed in, so the rules are tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Picker:
    seeds: tuple[str, ...]
    cooldown_s: float = 5.0
    _addresses: list[str] = field(default_factory=list)
    _down_until: dict[str, float] = field(default_factory=dict)
    _turn: int = 0

    def __post_init__(self) -> None:
        self._addresses = list(self.seeds)

    def update(self, addresses: Iterable[str]) -> None:
        """The DC's healthy agents as an agent just listed them (seeds if none)."""
        self._addresses = list(dict.fromkeys(addresses)) or list(self.seeds)

    def failed(self, address: str, now: float) -> None:
        self._down_until[address] = now + self.cooldown_s

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    @property
    def to_ask(self) -> list[str]:
        """Whom to ask for the DC's agents: those listed last, then the seeds."""
        return list(dict.fromkeys([*self._addresses, *self.seeds]))

    def pick(self, now: float, tried: Iterable[str] = ()) -> str:
        """The next agent: not tried by this call and not cooling down, if any is left;
        else a seed so (every agent listed failed: their addresses may not be reachable
        from here, as a fleet's own names are not outside its network); else one not
        tried; else the next in turn (a retry beats no call)."""
        tried = set(tried)
        candidates = [a for a in self._addresses if a not in tried]
        ready = [a for a in candidates if self._down_until.get(a, 0.0) <= now]
        seeds = [a for a in self.seeds if a not in tried and self._down_until.get(a, 0.0) <= now]
        pool = ready or seeds or candidates or self._addresses
        chosen = pool[self._turn % len(pool)]
        self._turn += 1
        return chosen
