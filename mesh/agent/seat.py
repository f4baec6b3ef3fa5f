"""This agent's candidacy for its DC's queue owner, under its current lease.

The seat stands (a ``QueueOwner`` with its election and its guard, as two duties), stands
again under a new lease after a lost one, and gives the queue up at once when the agent
stops. It follows the DC for the owner: members and capacity from the events, the
priority policy as it changes; a seat with no owner standing ignores them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mesh.agent.duties import Duties, Kept
from mesh.agent.events import Events
from mesh.agent.owner import QueueOwner


class OwnerSeat:
    def __init__(
        self,
        duties: Duties,
        make: Callable[[], QueueOwner],
        members: Callable[[], Mapping[str, object]],
        lease_ttl_s: float,
        events: Events,
        policy: Callable[[], object],
    ) -> None:
        """``make`` builds an owner under the current lease; ``members`` are the DC's
        members now (a new owner starts from them); ``policy`` the priority now."""
        self._duties = duties
        self._make = make
        self._members = members
        self._lease_ttl_s = lease_ttl_s
        self._policy = policy
        self.owner: QueueOwner | None = None
        self._kept: list[Kept] = []  # the owner's campaign and its guard
        events.members.connect(self._members_changed)
        events.capacity.connect(self._capacity_changed)
        events.priority.connect(self._priority_changed)

    async def stand(self) -> None:
        """Stand under the current lease (after stopping the owner of the lease before)."""
        await self.sit_out()
        owner = self.owner = self._make()
        owner.members_changed(self._members())
        self._kept = [
            self._duties.keep("queue owner", owner.run),
            self._duties.keep("owner guard", lambda: owner.guard(self._lease_ttl_s)),
        ]

    async def sit_out(self) -> None:
        for kept in self._kept:
            await kept.stop()
        self._kept = []

    async def give_up(self) -> None:
        """Hand the DC's queue over at once: stop the owner and resign its term."""
        if self.owner is not None:
            await self.sit_out()
            await self.owner.election.resign()

    def _members_changed(self, changes: Mapping[str, object | None]) -> None:
        if self.owner is not None:
            self.owner.members_changed(changes)

    def _capacity_changed(self) -> None:
        if self.owner is not None:
            self.owner.capacity_changed()

    def _priority_changed(self) -> None:
        if self.owner is not None:
            self.owner.dispatcher.policy = self._policy()  # type: ignore[assignment]
