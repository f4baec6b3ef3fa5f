"""The mesh's certificate authority and the certificates it issues (``cryptography``).

Every name in a certificate says who it is for, SPIFFE-style, so that a peer is known by
its certificate alone:

- an **agent**: URI SAN ``spiffe://<mesh>/dc/<dc>/agent/<id>``, DNS SANs ``agent.<mesh>``
  and ``<dc>.agent.<mesh>`` (the names a client verifies the server against, whatever
  address it dialled: any agent, or an agent of that DC), CN ``agent.<dc>`` (the etcd
  user of its DC's agents, under ``--client-cert-auth``);
- a **user**: URI SAN ``spiffe://<mesh>/user/<name>``, CN ``user:<name>`` (a name no etcd
  user has, so no user certificate is ever an etcd identity), O its groups and OU its
  roles, as Kubernetes reads client certificates; reserved names (``root``,
  ``operator``, ``agent.*``, ``etcd*``) are refused;
- an **admin** of etcd (``root``, ``operator``): a user certificate whose CN is that etcd
  user, issued only by ``pki init``;
- an **etcd** member: CN ``etcd-peer.<mesh>``, the one name etcd's peer port admits
  (``--peer-cert-allowed-cn``), and its hosts as DNS or IP SANs, for clients and peers.

Keys are ECDSA P-256. Operators may bring their own CA (cert-manager, SPIRE, Vault): the
agent's config takes file paths only. Files are written 0600 in 0700 folders.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.core.access import AGENT, ROLES, Identity, reserved
from mesh.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # agent ids, DC and user names
CA_DAYS = 3650
LEAF_DAYS = 365
CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
SERVER_AND_CLIENT = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def agent_host(mesh: str, dc: str = "") -> str:
    """The DNS name a client checks an agent's certificate against: ``agent.<mesh>`` for
    any agent of the mesh, ``<dc>.agent.<mesh>`` for an agent of that DC."""
    return f"{dc}.agent.{mesh}" if dc else f"agent.{mesh}"


def etcd_host(mesh: str) -> str:
    """The DNS name every etcd member's certificate carries, and every client checks."""
    return f"etcd.{mesh}"


def etcd_peer(mesh: str) -> str:
    """The CN every etcd member's certificate carries, and the only one etcd's peer (raft)
    port admits: no user's or agent's certificate of the CA can join, read or renew there."""
    return f"etcd-peer.{mesh}"


def etcd_user(dc: str) -> str:
    """The etcd user (certificate CN) a DC's agents share: RBAC confines it to the DC."""
    return f"agent.{dc}"


@dataclass(frozen=True, slots=True)
class Pem:
    key: bytes
    cert: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Authority:
    """A CA: its key signs, its certificate is what every party trusts."""

    def __init__(self, mesh: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.mesh = mesh
        self._key = key
        self.cert = cert

    @classmethod
    def create(cls, mesh: str, days: int = CA_DAYS) -> Authority:
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{mesh} mesh CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(mesh, key, cert)

    @classmethod
    def load(cls, mesh: str, directory: Path) -> Authority:
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the mesh CA from {directory}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{directory}/ca.key: expected an EC key")
        return cls(mesh, key, cert)

    def save(self, directory: Path) -> None:
        write_pair(directory, "ca", Pem(_key_pem(self._key), _cert_pem(self.cert)))

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    def _issue(
        self,
        common_name: str,
        sans: list[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        days: float,
        extra_names: Iterable[x509.NameAttribute] = (),
    ) -> Pem:
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name), *extra_names])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Pem(_key_pem(key), _cert_pem(builder.sign(self._key, hashes.SHA256())))

    def issue_agent(
        self, agent_id: str, dc: str, hosts: Iterable[str] = (), days: float = LEAF_DAYS
    ) -> Pem:
        sans = [
            x509.UniformResourceIdentifier(spiffe_agent(self.mesh, dc, agent_id)),
            x509.DNSName(agent_host(self.mesh)),
            x509.DNSName(agent_host(self.mesh, dc)),
            *host_names(hosts),
        ]
        return self._issue(etcd_user(dc), sans, SERVER_AND_CLIENT, days)

    def issue_user(
        self,
        name: str,
        groups: Iterable[str] = (),
        roles: Iterable[str] = (),
        days: float = LEAF_DAYS,
    ) -> Pem:
        """A user's certificate; its CN (``user:<name>``) is no etcd user's."""
        if not NAME.fullmatch(name):
            raise ConfigError(f"user {name!r}: 1-63 characters of [A-Za-z0-9._-]")
        if reserved(name):
            raise ConfigError(f"user name {name!r} is reserved for the mesh's own identities")
        return self._user(f"user:{name}", name, groups, roles, days)

    def issue_admin(self, name: str, roles: Iterable[str] = (), days: float = LEAF_DAYS) -> Pem:
        """The certificate of one of etcd's own users (``root``, ``operator``): its CN is
        that user, which etcd's ``--client-cert-auth`` maps it to."""
        return self._user(name, name, (), roles, days)

    def _user(
        self, common_name: str, name: str, groups: Iterable[str], roles: Iterable[str], days: float
    ) -> Pem:
        extra = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        extra += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r) for r in roles]
        sans = [x509.UniformResourceIdentifier(spiffe_user(self.mesh, name))]
        return self._issue(common_name, sans, [ExtendedKeyUsageOID.CLIENT_AUTH], days, extra)

    def issue_etcd(self, name: str, hosts: Iterable[str], days: float = LEAF_DAYS) -> Pem:
        """An etcd member (``name`` names its files only): ``etcd.<mesh>`` for clients,
        its hosts for its peers, and the peer name its peers admit."""
        sans = [x509.DNSName(etcd_host(self.mesh)), *host_names(hosts)]
        return self._issue(etcd_peer(self.mesh), sans, SERVER_AND_CLIENT, days)


def host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def spiffe_agent(mesh: str, dc: str, agent_id: str) -> str:
    return f"spiffe://{mesh}/dc/{dc}/agent/{agent_id}"


def spiffe_user(mesh: str, name: str) -> str:
    return f"spiffe://{mesh}/user/{name}"


@functools.lru_cache(maxsize=1024)
def identity_of(cert_pem: bytes, mesh: str) -> Identity | None:
    """Who a verified peer certificate names, in this mesh; None if it names nobody here
    (another mesh, or no SPIFFE URI). The chain was checked by TLS already, at each
    handshake: what it names is the certificate's text alone, so it is parsed once (every
    call on the mTLS port asks)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    prefix = f"spiffe://{mesh}/"
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.startswith(prefix):
            continue
        match uri[len(prefix) :].split("/"):
            case ["dc", dc, "agent", agent_id] if NAME.fullmatch(dc) and NAME.fullmatch(agent_id):
                return Identity("agent", agent_id, dc=dc, roles=frozenset({AGENT}))
            case ["user", name] if NAME.fullmatch(name):
                subject = cert.subject
                return Identity(
                    "user",
                    name,
                    groups=tuple(_values(subject, NameOID.ORGANIZATION_NAME)),
                    # A user's certificate never makes it an agent, whatever it says.
                    roles=frozenset(_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME))
                    & (ROLES - {AGENT}),
                )
    return None


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def private_dir(path: Path) -> Path:
    """A folder only its owner may enter (0700), created if need be. A link, or a folder
    another user owns, is refused rather than used: in a shared place such as /tmp, that
    is how someone else would have files written, read or deleted where they point."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode):
        raise ConfigError(f"{path} is not a folder (a link?): refusing to use it")
    if found.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to another user (uid {found.st_uid}): refusing it")
    os.chmod(path, 0o700, follow_symlinks=False)
    return path


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner alone (0600), from the moment it exists."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def write_pair(directory: Path, name: str, pem: Pem) -> tuple[Path, Path]:
    """``name.key`` (0600) and ``name.crt`` under ``directory`` (0700)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    write_secret(key, pem.key)
    write_secret(cert, pem.cert)
    return key, cert
