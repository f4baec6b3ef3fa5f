"""The mesh's certificates and tokens on their own: who they name, and what they refuse."""

from __future__ import annotations

import datetime
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from mesh.core.access import AGENT, Unauthenticated
from mesh.errors import ConfigError
from mesh.trust import tokens
from mesh.trust.pki import Authority, identity_of, private_dir, write_pair
from mesh.trust.tokens import SigningKey, Verifier

CA = Authority.create("gpumesh")


def test_an_agent_certificate_names_its_agent_and_dc() -> None:
    identity = identity_of(CA.issue_agent("w1", "west").cert, "gpumesh")
    assert identity is not None
    assert (identity.kind, identity.name, identity.dc, identity.roles) == (
        "agent", "w1", "west", frozenset({AGENT}),
    )  # fmt: skip


def test_a_user_certificate_carries_groups_and_roles_but_never_agent() -> None:
    pem = CA.issue_user("alice", groups=["vision", "ml"], roles=["submitter", "agent"])
    identity = identity_of(pem.cert, "gpumesh")
    assert identity is not None
    assert (identity.kind, identity.name, identity.groups) == ("user", "alice", ("vision", "ml"))
    assert identity.roles == frozenset({"submitter"})


def test_a_certificate_of_another_mesh_names_nobody_here() -> None:
    other = Authority.create("elsewhere")
    assert identity_of(other.issue_agent("w1", "west").cert, "gpumesh") is None
    assert identity_of(CA.issue_etcd("e", ["127.0.0.1"]).cert, "gpumesh") is None


def test_keys_are_written_for_their_owner_alone(tmp_path: Path) -> None:
    key, cert = write_pair(tmp_path / "pki", "a", CA.issue_agent("a", "west"))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 == stat.S_IMODE(cert.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    assert stat.S_IMODE(private_dir(tmp_path / "pki").stat().st_mode) == 0o700


KEY = SigningKey.generate()
VERIFIER = Verifier("gpumesh", {KEY.kid: KEY.public_pem()})


def test_a_token_names_its_user_groups_and_roles() -> None:
    token = KEY.issue("gpumesh", "alice", groups=["vision"], roles=["submitter"])
    identity = VERIFIER.verify(token)
    assert (identity.name, identity.groups, identity.roles) == (
        "alice", ("vision",), frozenset({"submitter"}),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (KEY.issue("gpumesh", "a", ttl=datetime.timedelta(seconds=-120)), "expired"),
        (KEY.issue("another-mesh", "a"), "invalid token"),
        (SigningKey.generate().issue("gpumesh", "a"), "unknown key"),
        ("x" * 9000, "too long"),
        ("a.b.c", "malformed"),
    ],
)
def test_a_token_that_does_not_hold_is_refused(token: str, words: str) -> None:
    with pytest.raises(Unauthenticated, match=words):
        VERIFIER.verify(token)


def test_a_token_never_makes_an_agent_and_bad_claims_are_refused() -> None:
    with pytest.raises(ConfigError, match="reserved role"):
        KEY.issue("gpumesh", "mallory", roles=["agent"])
    with pytest.raises(ConfigError, match="user"):
        KEY.issue("gpumesh", "../etc", roles=["reader"])


def test_two_keys_are_valid_at_once_during_a_rotation() -> None:
    new = SigningKey.generate()
    both = Verifier("gpumesh", {KEY.kid: KEY.public_pem(), new.kid: new.public_pem()})
    assert both.verify(KEY.issue("gpumesh", "a")).name == "a"
    assert both.verify(new.issue("gpumesh", "b")).name == "b"
    both.update({new.kid: new.public_pem()})  # the old one retired
    with pytest.raises(Unauthenticated):
        both.verify(KEY.issue("gpumesh", "a"))


def test_a_token_lives_no_longer_than_the_mesh_allows() -> None:
    """The review issued a 100-year token: issuing refuses past ``MAX_TTL``, and an agent
    refuses a token that says it lives longer than its ``max_token_ttl_s``."""
    with pytest.raises(ConfigError, match="at most 30 days"):
        KEY.issue("gpumesh", "a", ttl=datetime.timedelta(days=365 * 100))
    strict = Verifier("gpumesh", {KEY.kid: KEY.public_pem()}, max_ttl_s=3600)
    with pytest.raises(Unauthenticated, match="longer than this mesh allows"):
        strict.verify(KEY.issue("gpumesh", "a", ttl=datetime.timedelta(days=1)))
    assert strict.verify(KEY.issue("gpumesh", "a", ttl=datetime.timedelta(minutes=30))).name == "a"


@pytest.mark.parametrize("name", ["operator", "root", "Operator", "agent.west", "etcd-peer.x"])
def test_a_reserved_name_is_no_users(name: str) -> None:
    """etcd maps a client certificate's CN to its user: a user certificate named
    ``operator`` was etcd's operator. Reserved names are refused for certificates and
    tokens alike, and a user's CN is ``user:<name>``, which no etcd user is."""
    with pytest.raises(ConfigError, match="reserved"):
        CA.issue_user(name)
    with pytest.raises(ConfigError, match="reserved"):
        KEY.issue("gpumesh", name)


def test_a_user_certificate_names_the_user_but_no_etcd_user() -> None:
    pem = CA.issue_user("alice", roles=["submitter"])
    assert identity_of(pem.cert, "gpumesh").name == "alice"
    subject = x509.load_pem_x509_certificate(pem.cert).subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "user:alice"
    member = x509.load_pem_x509_certificate(CA.issue_etcd("e0", ["127.0.0.1"]).cert).subject
    assert member.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "etcd-peer.gpumesh"


def test_a_verified_token_is_known_until_it_expires_or_its_key_retires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache of verified tokens must not outlive what verifying would say: the
    token's expiry (with the leeway), and its key's place in the published keys."""
    checks = []
    decode = tokens.jwt.decode
    monkeypatch.setattr(tokens.jwt, "decode", lambda *a, **k: checks.append(1) or decode(*a, **k))
    now = [time.time()]
    verifier = Verifier("gpumesh", {KEY.kid: KEY.public_pem()}, clock=lambda: now[0])
    token = KEY.issue("gpumesh", "a", ttl=datetime.timedelta(minutes=5))
    assert verifier.verify(token) is verifier.verify(token)
    assert len(checks) == 1  # the signature checked once
    now[0] += 5 * 60 + tokens.LEEWAY_S + 1  # past its expiry: checked again
    verifier.verify(token)
    assert len(checks) == 2
    verifier.update({})  # its key retired: refused at once, though it was known
    with pytest.raises(Unauthenticated, match="unknown key"):
        verifier.verify(token)
