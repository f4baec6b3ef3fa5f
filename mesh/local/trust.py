"""A mesh's trust material on one machine, made without a single extra step.

Under one 0700 folder: the mesh CA, certificates for the operator (``meshctl``) and
etcd's ``root`` (bootstrap only), one per agent and per etcd member as they are needed,
the token signing key, and the gossip key. ``meshctl up``, ``meshctl demo``, the test
fixtures, the chaos suite and the benchmarks all build their meshes from it, so each
runs exactly as secure as a real fleet.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mesh.channels import Security
from mesh.core.access import OPERATOR, PRIORITY, READER, SUBMITTER
from mesh.local.etcdserver import MemberTls
from mesh.store.etcd import client_for
from mesh.store.rbac import ROOT, Rbac
from mesh.store.topostore import token_keys
from mesh.trust.pki import Authority, etcd_peer, private_dir, write_pair, write_secret
from mesh.trust.tokens import SigningKey

SUBMITTER_ROLES = (SUBMITTER, READER)
# The load the demo, the chaos suite and the benchmarks send uses every queue class.
LOAD_ROLES = (*SUBMITTER_ROLES, PRIORITY)


@dataclass(frozen=True, slots=True)
class AgentFiles:
    ca: Path
    cert: Path
    key: Path


class LocalTrust:
    def __init__(self, root: Path, mesh: str) -> None:
        self.root = root
        self.mesh = mesh
        self._ca = Authority.load(mesh, root)
        self._token_key = SigningKey.from_pem(
            (root / "token.kid").read_text().strip(), (root / "token.key").read_bytes()
        )

    @classmethod
    def create(cls, root: Path, mesh: str) -> LocalTrust:
        """Make everything a mesh needs under ``root`` (0700), unless it is there."""
        private_dir(root)
        if not (root / "ca.crt").exists():
            ca = Authority.create(mesh)
            ca.save(root)
            write_pair(root, "operator", ca.issue_admin(OPERATOR, roles=[OPERATOR]))
            write_pair(root, ROOT, ca.issue_admin(ROOT))
            key = SigningKey.generate()
            write_secret(root / "token.key", key.private_pem())
            write_secret(root / "token.kid", key.kid.encode())
            write_secret(root / "gossip.keys", secrets.token_hex(32).encode() + b"\n")
        return cls(root, mesh)

    @property
    def token_key(self) -> SigningKey:
        return self._token_key

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def gossip_key_file(self) -> Path:
        return self.root / "gossip.keys"

    def agent(self, agent_id: str, dc: str, hosts: Iterable[str] = ()) -> AgentFiles:
        folder, name = self.root / "agents", f"{dc}.{agent_id}"
        if not (folder / f"{name}.crt").exists():
            write_pair(folder, name, self._ca.issue_agent(agent_id, dc, hosts))
        return AgentFiles(self.ca, folder / f"{name}.crt", folder / f"{name}.key")

    def etcd(self, name: str, hosts: Iterable[str]) -> MemberTls:
        folder = self.root / "etcd"
        if not (folder / f"{name}.crt").exists():
            write_pair(folder, name, self._ca.issue_etcd(name, hosts))
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        return MemberTls(self.ca, cert, key, etcd_peer(self.mesh))

    def _certified(self, name: str) -> Security:
        return Security.from_files(
            self.mesh, self.ca, self.root / f"{name}.crt", self.root / f"{name}.key"
        )

    def operator(self) -> Security:
        """The operator's certificate: for agents' mTLS ports and for etcd."""
        return self._certified("operator")

    def token(
        self,
        user: str,
        groups: Iterable[str] = (),
        roles: Iterable[str] = SUBMITTER_ROLES,
        ttl: datetime.timedelta = datetime.timedelta(days=1),
    ) -> str:
        return self._token_key.issue(self.mesh, user, groups, roles, ttl)

    def user(
        self, user: str, groups: Iterable[str] = (), roles: Iterable[str] = SUBMITTER_ROLES
    ) -> Security:
        """A user's bearer token, for agents' API ports."""
        return Security(self.mesh, self.ca.read_bytes(), token=self.token(user, groups, roles))

    async def secure_etcd(self, endpoints: list[str], prefix: str, dcs: Iterable[str]) -> None:
        """Switch on etcd's authorization (idempotent), confine each DC's agents to their
        keys, and publish the token key for agents to check tokens with."""
        async with client_for(endpoints, security=self._certified(ROOT)) as root:
            rbac = Rbac(root)
            await rbac.bootstrap()
            await rbac.grant_mesh(prefix, dcs)
        async with client_for(endpoints, security=self.operator()) as operator:
            await operator.put(
                token_keys(prefix) + self._token_key.kid.encode(), self._token_key.public_pem()
            )

    def secure_etcd_now(self, endpoints: list[str], prefix: str, dcs: Iterable[str]) -> None:
        """``secure_etcd`` from synchronous code, even inside a running event loop (on
        a thread of its own)."""
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, self.secure_etcd(endpoints, prefix, list(dcs))).result()
