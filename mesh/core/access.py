"""Who is calling, and what each RPC requires: identities and the one table of rules.

An ``Identity`` is resolved once per call, from the caller's certificate or its bearer
token (``mesh.agent.auth``); nothing in a request decides it. Every RPC of the mesh has
exactly one ``Rule`` here, naming the roles that may call it; some roles may act only on
their own tasks (a submitter reads and cancels its own, a reader reads all, an operator
cancels any). ``tests/core/test_access.py`` walks every RPC the protos declare and fails if
one has no rule. Pure: no certificate, token or transport in sight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.errors import MeshError

SUBMITTER = "submitter"
READER = "reader"
OPERATOR = "operator"
AGENT = "agent"
GROUP_ADMIN = "group-admin"  # splits the caps of its own groups among their users
PRIORITY = "priority"  # may submit to the privileged queue classes (vip)
ROLES = frozenset({SUBMITTER, READER, OPERATOR, AGENT, GROUP_ADMIN, PRIORITY})
# What a role brings with it: an operator may also read and submit, use every queue class,
# and split any group.
IMPLIES = {OPERATOR: frozenset({READER, SUBMITTER, GROUP_ADMIN, PRIORITY})}


class Unauthenticated(MeshError):
    """No identity could be established: no credential, or one that does not hold."""

    code = "UNAUTHENTICATED"


class PermissionDenied(MeshError):
    """The caller is known, and may not do this."""

    code = "PERMISSION_DENIED"


@dataclass(frozen=True, slots=True)
class Identity:
    kind: str  # "agent", "user", or "anonymous" (insecure mode only)
    name: str  # the agent id, or the user name
    dc: str = ""  # an agent's DC
    groups: tuple[str, ...] = ()
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def held(self) -> frozenset[str]:
        """Its roles with what they imply."""
        out = set(self.roles)
        for role in self.roles:
            out |= IMPLIES.get(role, frozenset())
        return frozenset(out)

    def __str__(self) -> str:
        return f"agent {self.name} of {self.dc}" if self.kind == "agent" else f"user {self.name}"


# Names no user certificate or token may carry: etcd's own users (``root``, ``operator``,
# a DC's agents ``agent.<dc>``, the members' peer name ``etcd-peer.<mesh>``) and the
# insecure mode's caller. A user named ``operator`` would otherwise be the operator's
# identity on every agent (its tasks, its name in logs), whatever roles it carried.
RESERVED_USERS = frozenset({"root", "operator", "anonymous"})
RESERVED_PREFIXES = ("agent.", "etcd")


def reserved(name: str) -> bool:
    """Whether ``name`` is kept for the mesh's own identities (case-insensitively)."""
    folded = name.casefold()
    return folded in RESERVED_USERS or folded.startswith(RESERVED_PREFIXES)


# Insecure mode: every caller is this, holding every role (``--insecure``, logged loudly);
# an agent forwarding a user's call says so, and is this.
ANYONE = Identity("anonymous", "anonymous", roles=ROLES)
ANY_AGENT = Identity("agent", "anonymous", roles=ROLES)


@dataclass(frozen=True, slots=True)
class Rule:
    """The roles that may call an RPC; holders of only an ``own`` role act on their own
    tasks alone."""

    roles: frozenset[str]
    own: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Grant:
    """What a caller may do in this call: all tasks, or only its own."""

    identity: Identity
    all_tasks: bool


def rule(*roles: str, own: tuple[str, ...] = ()) -> Rule:
    return Rule(frozenset(roles), frozenset(own))


TASKS = "/mesh.v1.TaskService/"
AGENTS = "/mesh.v1.AgentService/"
PEERS = "/mesh.v1.PeerService/"
# Agents read, list and cancel tasks in other DCs for the users they serve, having checked
# that user's right on the task as that DC reports it (or asked only for that user's).
RULES: dict[str, Rule] = {
    TASKS + "Submit": rule(SUBMITTER),
    TASKS + "SubmitStream": rule(SUBMITTER),
    TASKS + "Get": rule(SUBMITTER, READER, AGENT, own=(SUBMITTER,)),
    TASKS + "Watch": rule(SUBMITTER, READER, AGENT, own=(SUBMITTER,)),
    TASKS + "List": rule(SUBMITTER, READER, AGENT, own=(SUBMITTER,)),
    TASKS + "Cancel": rule(SUBMITTER, OPERATOR, AGENT, own=(SUBMITTER,)),
    TASKS + "Rerun": rule(SUBMITTER, AGENT, own=(SUBMITTER,)),
    TASKS + "GetResult": rule(SUBMITTER, READER, AGENT, own=(SUBMITTER,)),
    AGENTS + "ListAgents": rule(SUBMITTER, READER),
    AGENTS + "Route": rule(SUBMITTER, READER),
    AGENTS + "Queue": rule(SUBMITTER, READER),
    AGENTS + "Drain": rule(OPERATOR),
    AGENTS + "Undrain": rule(OPERATOR),
    AGENTS + "SplitQuota": rule(GROUP_ADMIN),
    PEERS + "Offer": rule(AGENT),
    PEERS + "CancelLocal": rule(AGENT),
    PEERS + "Summary": rule(AGENT),
    PEERS + "Settle": rule(AGENT),
    PEERS + "FetchResult": rule(AGENT),
    PEERS + "Claim": rule(AGENT),
    PEERS + "RunStage": rule(AGENT),
}
# Open to anyone who completed the TLS handshake: liveness probes and the schema, which
# is public in proto/ anyway.
PUBLIC = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


# Queue classes beyond the open ones, and the roles that may submit to them: ``vip`` is
# weighted 4x ``normal`` in every agent's queue and the backlog, so a plain submitter who
# could name it would jump everyone else's work. Any other class of the topology is open.
QUEUES: dict[str, frozenset[str]] = {"vip": frozenset({PRIORITY})}


def may_queue(identity: Identity, queue: str) -> None:
    """Whether ``identity`` may submit to queue class ``queue``; ``PermissionDenied`` if not."""
    needed = QUEUES.get(queue)
    if needed is None or identity is ANYONE or identity.held & needed:
        return
    raise PermissionDenied(
        f"{identity} may not submit to queue {queue!r} (it takes role {', '.join(sorted(needed))})"
    )


def may_administer(identity: Identity, group: str) -> None:
    """A group admin acts on its own groups; an operator on any."""
    if OPERATOR in identity.held or identity is ANYONE:
        return
    if GROUP_ADMIN not in identity.held or group not in identity.groups:
        raise PermissionDenied(f"{identity} is no admin of group {group!r}")


def authorize(identity: Identity, method: str) -> Grant:
    """Whether ``identity`` may call ``method``, and on which tasks; ``PermissionDenied``
    if not (also for a method with no rule: nothing is allowed by default)."""
    found = RULES.get(method)
    if found is None:
        raise PermissionDenied("no rule allows this call", method=method)
    held = identity.held & found.roles
    if not held:
        raise PermissionDenied(
            f"{identity} may not call {method.rsplit('/', 1)[-1]}",
            needs=" or ".join(sorted(found.roles)),
        )
    return Grant(identity, all_tasks=bool(held - found.own))
