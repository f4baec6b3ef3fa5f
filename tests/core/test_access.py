"""The one table of rules: every RPC of the protos has exactly one, and the decisions it
makes, as a pure function of identity and method."""

from __future__ import annotations

import pytest

from mesh.core.access import (
    AGENT,
    OPERATOR,
    PRIORITY,
    PUBLIC,
    READER,
    RULES,
    SUBMITTER,
    Identity,
    PermissionDenied,
    authorize,
    may_queue,
)
from mesh.v1 import peer_pb2, tasks_pb2


def every_rpc() -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for module in (tasks_pb2, peer_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_of_the_protos_has_its_rule_and_no_rule_is_stale() -> None:
    assert every_rpc() - RULES.keys() == set(), "an RPC without a rule: nobody may call it"
    assert RULES.keys() - every_rpc() == set(), "a rule for an RPC the protos do not declare"
    assert not PUBLIC & RULES.keys()


def user(*roles: str) -> Identity:
    return Identity("user", "ada", roles=frozenset(roles))


AGENT_WEST = Identity("agent", "w1", dc="west", roles=frozenset({AGENT}))


@pytest.mark.parametrize(
    ("who", "method", "all_tasks"),
    [
        (user(SUBMITTER), "/mesh.v1.TaskService/Submit", True),
        (user(SUBMITTER), "/mesh.v1.TaskService/Get", False),  # its own only
        (user(READER), "/mesh.v1.TaskService/Get", True),
        (user(SUBMITTER, READER), "/mesh.v1.TaskService/List", True),
        (user(SUBMITTER), "/mesh.v1.TaskService/Cancel", False),
        (user(OPERATOR), "/mesh.v1.TaskService/Cancel", True),
        (user(OPERATOR), "/mesh.v1.TaskService/Submit", True),  # operator implies submitter
        (user(OPERATOR), "/mesh.v1.AgentService/Drain", True),
        (AGENT_WEST, "/mesh.v1.PeerService/Offer", True),
        (AGENT_WEST, "/mesh.v1.TaskService/Get", True),  # forwarded for its users
    ],
)
def test_who_may_call_what(who: Identity, method: str, all_tasks: bool) -> None:
    assert authorize(who, method).all_tasks is all_tasks


@pytest.mark.parametrize(
    ("who", "method"),
    [
        (user(READER), "/mesh.v1.TaskService/Submit"),
        (user(SUBMITTER), "/mesh.v1.AgentService/Drain"),
        (user(OPERATOR), "/mesh.v1.PeerService/Offer"),  # users never speak as agents
        (AGENT_WEST, "/mesh.v1.TaskService/Submit"),
        (AGENT_WEST, "/mesh.v1.AgentService/Undrain"),
        (user(OPERATOR), "/mesh.v1.TaskService/Unknown"),  # no rule: nobody
        (Identity("user", "nobody"), "/mesh.v1.AgentService/ListAgents"),
    ],
)
def test_who_may_not(who: Identity, method: str) -> None:
    with pytest.raises(PermissionDenied):
        authorize(who, method)


def test_the_vip_queue_takes_the_priority_role() -> None:
    """``vip`` weighs 4x ``normal`` in every queue: the review found it open to every
    submitter, while online work already took an operator."""
    plain = Identity("user", "bob", roles=frozenset({SUBMITTER}))
    with pytest.raises(PermissionDenied, match="queue 'vip'"):
        may_queue(plain, "vip")
    may_queue(plain, "normal")
    may_queue(Identity("user", "pam", roles=frozenset({SUBMITTER, PRIORITY})), "vip")
    may_queue(Identity("user", "ops", roles=frozenset({OPERATOR})), "vip")  # implied
