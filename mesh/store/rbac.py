"""etcd's own authorization, set up for a mesh: who may read and write which keys.

etcd runs with ``--client-cert-auth``, so the CN of a client's certificate is its etcd
user. Users and what they may touch:

- ``root``: bootstraps the rest, then is not used;
- ``operator`` (``meshctl``): reads and writes everything under ``/{prefix}/``: the
  topology, token keys, quotas;
- ``agent.<dc>`` (every agent of DC ``dc``): reads and writes ``/{prefix}/{dc}/`` and
  only reads what all DCs share (``/{prefix}/topology/``, ``/{prefix}/trust/``), so an
  agent can neither touch another DC's records nor change the topology or token keys.

aetcd has no calls for etcd's Auth service; this speaks to it with aetcd's own
generated stubs on the client's channel. Every step is idempotent, so it can run again
on every ``meshctl up`` and for every test's key prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

import aetcd
import aetcd.rpc
import grpc

from mesh.errors import Unavailable
from mesh.store.etcd import stub_options
from mesh.store.kv import prefix_end
from mesh.trust.pki import etcd_user

ROOT = "root"
OPERATOR = "operator"
READ = aetcd.rpc.Permission.READ
READWRITE = aetcd.rpc.Permission.READWRITE


class Rbac:
    def __init__(self, root_client: aetcd.Client) -> None:
        """``root_client`` is connected with the ``root`` user's certificate."""
        self._client = root_client

    def _stub(self) -> aetcd.rpc.AuthStub:
        return aetcd.rpc.AuthStub(self._client.channel)

    async def _call(self, method: str, request: object, exists_ok: bool = False) -> None:
        try:
            await getattr(self._stub(), method)(request, **stub_options(self._client))
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exists_ok and "already exist" in details:
                return
            raise Unavailable(f"etcd auth {method}: {details}") from exc

    async def user(self, name: str, *roles: str) -> None:
        """A user known by its certificate's CN alone (no password), with ``roles``."""
        options = aetcd.rpc.UserAddOptions(no_password=True)
        await self._call(
            "UserAdd", aetcd.rpc.AuthUserAddRequest(name=name, options=options), exists_ok=True
        )
        for role in roles:
            grant = aetcd.rpc.AuthUserGrantRoleRequest(user=name, role=role)
            await self._call("UserGrantRole", grant)

    async def role(self, name: str, grants: Iterable[tuple[bytes, int]] = ()) -> None:
        """A role, granted each ``(prefix, READ | READWRITE)``."""
        await self._call("RoleAdd", aetcd.rpc.AuthRoleAddRequest(name=name), exists_ok=True)
        for prefix, kind in grants:
            permission = aetcd.rpc.Permission(
                permType=kind, key=prefix, range_end=prefix_end(prefix)
            )
            await self._call(
                "RoleGrantPermission",
                aetcd.rpc.AuthRoleGrantPermissionRequest(name=name, perm=permission),
            )

    async def enable(self) -> None:
        await self._call("AuthEnable", aetcd.rpc.AuthEnableRequest())

    async def bootstrap(self) -> None:
        """The root user, then etcd's authorization switched on."""
        await self.role(ROOT)
        await self.user(ROOT, ROOT)
        await self.enable()

    async def grant_mesh(self, prefix: str, dcs: Iterable[str]) -> None:
        """Roles and users for mesh ``prefix``: the operator, and each DC's agents."""
        root = f"/{prefix}/".encode()
        await self.role(OPERATOR, [(root, READWRITE)])
        await self.user(OPERATOR, OPERATOR)
        shared = [(f"/{prefix}/topology/".encode(), READ), (f"/{prefix}/trust/".encode(), READ)]
        for dc in dcs:
            user = etcd_user(dc)
            await self.role(user, [(f"/{prefix}/{dc}/".encode(), READWRITE), *shared])
            await self.user(user, user)
