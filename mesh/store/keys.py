"""Every etcd key the mesh writes in a DC, in one place: ``/{prefix}/{dc}/...``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Every etcd key the mesh writes, in one place: ``/{prefix}/{dc}/...``."""

    prefix: str
    dc: str

    @property
    def root(self) -> bytes:
        return f"/{self.prefix}/{self.dc}/".encode()

    @property
    def agents(self) -> bytes:
        return self.root + b"agents/"

    def agent(self, agent_id: str) -> bytes:
        return self.agents + agent_id.encode()

    @property
    def tasks(self) -> bytes:
        return self.root + b"tasks/"

    def task(self, task_id: str) -> bytes:
        return self.tasks + task_id.encode()

    @property
    def running(self) -> bytes:
        return self.root + b"running/"

    def running_marker(self, task_id: str) -> bytes:
        return self.running + task_id.encode()

    @property
    def election(self) -> bytes:
        """Candidates for the DC's queue owner: ``etcdctl elect -l`` on it names the owner."""
        return self.root + b"election/queue-owner"

    @property
    def backlog(self) -> bytes:
        return self.root + b"backlog/"

    def backlog_entry(self, queue_class: str, enqueued_ms: int, task_id: str) -> bytes:
        """Sorted by class, then age: the oldest of a class lists first."""
        return self.backlog + f"{queue_class}/{enqueued_ms:013d}-{task_id}".encode()

    @property
    def claims(self) -> bytes:
        """Ids homed in this DC, each naming the DC that recorded its task."""
        return self.root + b"claims/"

    def claim(self, task_id: str) -> bytes:
        return self.claims + task_id.encode()

    @property
    def unclaimed(self) -> bytes:
        """Tasks recorded here while their home DC could not be asked: still to claim."""
        return self.root + b"unclaimed/"

    def unclaimed_task(self, task_id: str) -> bytes:
        return self.unclaimed + task_id.encode()

    @property
    def quota(self) -> bytes:
        """The tenants policy and the quota slots of capped tenants (``mesh.store.quota``)."""
        return self.root + b"quota/"

    def quota_slot(self, scope: str, name: str, index: int) -> bytes:
        return self.quota + f"slots/{scope}/{name}/{index}".encode()

    def quota_usage(self, period_s: int, period: int, scope: str, name: str, agent: str) -> bytes:
        """One agent's GPU-seconds against one budget in one period (its only writer)."""
        return self.quota + f"usage/{period_s}/{period}/{scope}/{name}/{agent}".encode()

    @property
    def summaries(self) -> bytes:
        return self.root + b"summaries/"

    def summary(self, dc: str) -> bytes:
        return self.summaries + dc.encode()
