"""Bearer tokens: JWTs signed by the mesh (PyJWT, EdDSA over Ed25519).

Claims: ``sub`` (the user), ``groups``, ``roles``, ``exp``, ``iat``, and ``iss``/``aud``
set to the mesh's name, so a token of another mesh is refused. The header's ``kid`` names
the signing key. Agents verify with the public keys published in their DC's etcd under
``/{prefix}/trust/token-keys/{kid}``: several may be valid at once, so a key is rotated
by publishing the new one, signing with it, and retiring the old one once its tokens
have expired. Only whoever holds a private key (the operator) can mint tokens.
"""

from __future__ import annotations

import datetime
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh.core.access import AGENT, ROLES, Identity, Unauthenticated, reserved
from mesh.errors import ConfigError

ALGORITHM = "EdDSA"
LEEWAY_S = 30  # clocks of the minting host and the agent may differ this much
CACHED_TOKENS = 4096  # tokens verified lately, kept with their identity (least recent out)
# The longest a token may live: issuing refuses more, and agents refuse a token that says
# it lives longer than their ``max_token_ttl_s`` (this by default). A token cannot be
# revoked, so a stolen one is good until it expires: keep them short.
MAX_TTL = datetime.timedelta(days=30)
MAX_TOKEN_BYTES = 8192
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,62}")
KID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SigningKey:
    def __init__(self, kid: str, key: Ed25519PrivateKey) -> None:
        if not KID.fullmatch(kid):
            raise ConfigError(f"token key id {kid!r}: 1-64 characters of [A-Za-z0-9_-]")
        self.kid = kid
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(secrets.token_hex(8), Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, kid: str, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("a token signing key must be Ed25519")
        return cls(kid, key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def issue(
        self,
        mesh: str,
        user: str,
        groups: Iterable[str] = (),
        roles: Iterable[str] = (),
        ttl: datetime.timedelta = datetime.timedelta(hours=1),
        now: datetime.datetime | None = None,
    ) -> str:
        if not NAME.fullmatch(user):
            raise ConfigError(f"user {user!r}: 1-63 characters of [A-Za-z0-9._@-]")
        if reserved(user):
            raise ConfigError(f"user name {user!r} is reserved for the mesh's own identities")
        if ttl > MAX_TTL:
            raise ConfigError(f"a token lives at most {MAX_TTL.days} days")
        bad = set(roles) - (ROLES - {AGENT})
        if bad:
            raise ConfigError(f"unknown or reserved role(s) {sorted(bad)}")
        issued = now or datetime.datetime.now(datetime.UTC)
        claims = {
            "sub": user,
            "groups": sorted(set(groups)),
            "roles": sorted(set(roles)),
            "iss": mesh,
            "aud": mesh,
            "iat": issued,
            "exp": issued + ttl,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid})


class Verifier:
    """Checks tokens against the published public keys of this mesh."""

    def __init__(
        self,
        mesh: str,
        keys: Mapping[str, bytes] | None = None,
        max_ttl_s: float = MAX_TTL.total_seconds(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """A token verified once is known by its text until it expires, or its key is
        retired: a signature check costs more than the rest of a small Submit, and a
        client sends the same token with every call."""
        self.mesh = mesh
        self._max_ttl_s = max_ttl_s
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._verified: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self.update(keys or {})

    def update(self, keys: Mapping[str, bytes]) -> None:
        """Adopt the published keys (kid to public PEM); unreadable ones are skipped."""
        loaded = {}
        for kid, pem in keys.items():
            try:
                key = serialization.load_pem_public_key(pem)
            except ValueError:
                continue
            if isinstance(key, Ed25519PublicKey) and KID.fullmatch(kid):
                loaded[kid] = key
        if loaded.keys() != self._keys.keys():
            self._verified.clear()  # a retired key's tokens are checked again, and refused
        self._keys = loaded

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, token: str) -> Identity:
        """The identity a valid token names; ``Unauthenticated`` otherwise."""
        known = self._verified.get(token)
        if known is not None and self._clock() < known[1]:
            self._verified.move_to_end(token)
            return known[0]
        identity, expires = self._checked(token)
        self._verified[token] = (identity, expires)
        self._verified.move_to_end(token)
        if len(self._verified) > CACHED_TOKENS:
            self._verified.popitem(last=False)
        return identity

    def _checked(self, token: str) -> tuple[Identity, float]:
        """The identity ``token`` names, and until when it holds, from its signature."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("token too long")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated("token signed by an unknown key", kid=str(kid)[:64])
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.mesh,
                issuer=self.mesh,
                leeway=LEEWAY_S,
                options={"require": ["sub", "exp", "iat", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        lifetime = claims["exp"] - claims["iat"]  # both numbers: PyJWT checked them
        if lifetime > self._max_ttl_s + LEEWAY_S:
            raise Unauthenticated(f"token lives longer than this mesh allows: {lifetime:g}s")
        return _identity(claims), claims["exp"] + LEEWAY_S


def _identity(claims: Mapping[str, object]) -> Identity:
    sub, groups, roles = claims.get("sub"), claims.get("groups", []), claims.get("roles", [])
    if not isinstance(sub, str) or not NAME.fullmatch(sub) or reserved(sub):
        raise Unauthenticated("token names no valid user")
    if not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
        raise Unauthenticated("token groups must be a list of names")
    if not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
        raise Unauthenticated("token roles must be a list of names")
    if len(groups) > 64 or any(not NAME.fullmatch(g) for g in groups):
        raise Unauthenticated("token groups must be at most 64 valid names")
    # A token never makes its bearer an agent, whatever it says.
    return Identity("user", sub, groups=tuple(groups), roles=frozenset(roles) & (ROLES - {AGENT}))
