"""Secure by default, tried as an outsider would: real agents, real TLS, real etcd with
client certificates and RBAC. Every refusal is a precise status, and nothing is written."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import ssl
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import Cluster, eventually, peer_channel, sleep_spec, wait_log

from mesh.channels import Security
from mesh.client import MeshClient
from mesh.core.clock import now_ms
from mesh.errors import ConfigError
from mesh.local.etcdserver import EtcdMember
from mesh.local.localmesh import free_port
from mesh.local.trust import LocalTrust
from mesh.store.etcd import client_for
from mesh.store.keys import KeySpace
from mesh.store.topostore import token_keys
from mesh.trust.pki import Authority, write_pair
from mesh.trust.tokens import SigningKey
from mesh.v1 import peer_pb2, peer_pb2_grpc
from mesh.v1 import tasks_pb2 as pb


async def not_(check: Awaitable[bool]) -> bool:
    return not await check


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.aio.AioRpcError), error
    return error.code()


async def refused(call: Callable[[], object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()  # type: ignore[misc]
    return caught.value


async def test_a_plaintext_client_is_refused_on_both_ports(cluster: Cluster) -> None:
    agent = cluster.start("a")
    for address in (agent.address, agent.peer_address):
        async with grpc.aio.insecure_channel(address) as channel:
            error = await refused(
                lambda c=channel: health_pb2_grpc.HealthStub(c).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            )
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_of_another_ca_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    agent = cluster.start("a")
    stranger = Authority.create("gpumesh")  # same mesh name, another CA
    key, cert = write_pair(tmp_path, "stranger", stranger.issue_agent("x", "west"))
    forged = Security.from_files("gpumesh", cluster.trust.ca, cert, key)
    async with peer_channel(agent.peer_address, forged) as channel:
        error = await refused(
            lambda: peer_pb2_grpc.PeerServiceStub(channel).Summary(
                peer_pb2.DcSummary(dc="west"), timeout=5
            )
        )
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # the handshake never completed


@pytest.mark.parametrize(
    ("forge", "words"),
    [
        (lambda t: "not-a-token", "malformed token"),
        (
            lambda t: t.token_key.issue(
                "gpumesh", "ada", roles=["submitter"], ttl=datetime.timedelta(hours=-1)
            ),
            "token expired",
        ),
        (lambda t: SigningKey.generate().issue("gpumesh", "ada"), "unknown key"),
        (lambda t: t.token_key.issue("another-mesh", "ada"), "invalid token"),
    ],
)
async def test_a_bad_token_is_unauthenticated(
    cluster: Cluster, forge: Callable[[LocalTrust], str], words: str
) -> None:
    agent = cluster.start("a")
    security = Security(
        cluster.trust.mesh, cluster.trust.ca.read_bytes(), token=forge(cluster.trust)
    )
    async with agent.client(security) as client:
        error = await refused(lambda: client.agents())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert words in (error.details() or "")


async def test_no_credential_is_unauthenticated(cluster: Cluster) -> None:
    agent = cluster.start("a")
    anonymous = Security(cluster.trust.mesh, cluster.trust.ca.read_bytes())
    async with agent.client(anonymous) as client:
        error = await refused(lambda: client.submit(sleep_spec("t", seconds=0, steps=1, model="m")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_key_counts_once_published_and_until_retired(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    agent = cluster.start("a")
    rotated = SigningKey.generate()
    token = rotated.issue("gpumesh", "ada", roles=["reader"])
    security = Security(cluster.trust.mesh, cluster.trust.ca.read_bytes(), token=token)
    async with agent.client(security) as client:

        async def accepted() -> bool:
            try:
                await client.agents()
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        assert not await accepted()
        await etcd_client.put(token_keys(prefix) + rotated.kid.encode(), rotated.public_pem())
        await eventually(accepted, what="a token of the published key to be accepted")
        async with agent.client() as old_key_user:  # the first key still holds
            assert [a.agent_id for a in await old_key_user.agents()] == ["a"]
        await etcd_client.delete(token_keys(prefix) + rotated.kid.encode())
        await eventually(lambda: not_(accepted()), what="a token of the retired key to be refused")


async def test_a_submitter_acts_on_its_own_tasks_only(cluster: Cluster) -> None:
    agent = cluster.start("a")
    alice = cluster.trust.user("alice", roles=["submitter"])
    bob = cluster.trust.user("bob", roles=["submitter"])
    async with agent.client(alice) as alices, agent.client(bob) as bobs:
        anyone = pb.User()  # the identity says whose it is
        await alices.submit(sleep_spec("alices", seconds=30, steps=1, model="m", user=anyone))
        for call in (
            lambda: bobs.cancel("alices"),
            lambda: bobs.get("alices"),
            lambda: bobs.list(user_id="alice"),
            lambda: bobs.submit(
                sleep_spec("t", seconds=0, steps=1, model="m", user=pb.User(id="alice"))
            ),
            lambda: bobs.drain(),
        ):
            assert code_of(await refused(call)) == grpc.StatusCode.PERMISSION_DENIED
        assert (await alices.get("alices")).spec.user.id == "alice"
        assert (await alices.cancel("alices")).task_id == "alices"
        # A denial echoed a 1 MB user id whole, past the client's metadata limit.
        someone = pb.User(id="x" * 1_000_000)
        huge = await refused(
            lambda: bobs.submit(sleep_spec("t", seconds=0, steps=1, model="m", user=someone))
        )
        precise = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
        assert code_of(huge) in precise
        assert len(huge.details() or "") <= 1024


async def test_an_offer_with_a_users_credential_is_denied(cluster: Cluster, tmp_path: Path) -> None:
    agent = cluster.start("a")
    envelope = peer_pb2.Envelope(
        spec=sleep_spec("t", seconds=0, steps=1, model="m", queue="normal", gpu_count=1),
        path=["x"], hops=1, attempt=1, deadline_unix_ms=now_ms() + 60_000,
    )  # fmt: skip
    token_user = cluster.trust.user("ada", roles=["operator"])
    async with peer_channel(agent.address, token_user) as channel:
        error = await refused(lambda: peer_pb2_grpc.PeerServiceStub(channel).Offer(envelope))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # A user certificate that says "agent" in its roles is still a user's.
    ca = Authority.load("gpumesh", cluster.trust.root)
    key, cert = write_pair(tmp_path, "eve", ca.issue_user("eve", roles=["agent", "operator"]))
    eve = Security.from_files("gpumesh", cluster.trust.ca, cert, key)
    async with peer_channel(agent.peer_address, eve) as channel:
        error = await refused(lambda: peer_pb2_grpc.PeerServiceStub(channel).Offer(envelope))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_crafted_id_offer_writes_nothing_anywhere(
    cluster: Cluster, etcd_client: aetcd.Client, prefix: str
) -> None:
    """The attack of the issue, replayed with a real agent certificate of another DC:
    an id that is a path, a big payload, a fresh origin. Nothing is written."""
    agent = cluster.start("a", inline_result_bytes=16)
    target = Path("/tmp/pwned-by-offer.1")
    await asyncio.to_thread(target.unlink, missing_ok=True)
    crafted = sleep_spec("/tmp/pwned-by-offer", seconds=0, steps=1, model="m", queue="normal")
    crafted.pipeline, crafted.payload = "echo", b"x" * 240_000
    envelope = peer_pb2.Envelope(
        spec=crafted, path=["east-1"], hops=1, attempt=1,
        deadline_unix_ms=now_ms() + 60_000, origin_dc="east",
    )  # fmt: skip
    async with peer_channel(agent.peer_address, cluster.as_agent("east-1", "east")) as channel:
        offer = peer_pb2_grpc.PeerServiceStub(channel).Offer
        error = await refused(lambda: offer(envelope))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        envelope.spec.task_id = "t\n"  # a trailing newline, as ^...$ would let through
        assert code_of(await refused(lambda: offer(envelope))) == grpc.StatusCode.INVALID_ARGUMENT
        envelope.spec.task_id, envelope.origin_dc = "fine", "mars"  # not the caller's DC
        assert code_of(await refused(lambda: offer(envelope))) == grpc.StatusCode.PERMISSION_DENIED
    assert not await asyncio.to_thread(target.exists)
    assert list(await etcd_client.get_prefix(KeySpace(prefix, "west").tasks)) == []
    results = cluster.workdir / "results"
    assert not await asyncio.to_thread(lambda: results.exists() and any(results.iterdir()))


async def test_a_summary_speaks_only_for_its_senders_dc(cluster: Cluster) -> None:
    agent = cluster.start("a")
    async with peer_channel(agent.peer_address, cluster.as_agent("east-1", "east")) as channel:
        summary = peer_pb2_grpc.PeerServiceStub(channel).Summary
        forged = peer_pb2.DcSummary(dc="north", ts_unix_ms=now_ms())
        assert code_of(await refused(lambda: summary(forged))) == grpc.StatusCode.PERMISSION_DENIED
        flooded = peer_pb2.DcSummary(dc="east", ts_unix_ms=now_ms(), live=["10.0.0.1:1"] * 50)
        assert code_of(await refused(lambda: summary(flooded))) == grpc.StatusCode.INVALID_ARGUMENT
        future = peer_pb2.DcSummary(dc="east", ts_unix_ms=now_ms() + 3_600_000)
        assert code_of(await refused(lambda: summary(future))) == grpc.StatusCode.INVALID_ARGUMENT
        fine = await summary(peer_pb2.DcSummary(dc="east", ts_unix_ms=now_ms()))
    assert fine.dc == "west"


async def test_anonymous_etcd_clients_are_refused(etcd: EtcdMember, cluster: Cluster) -> None:
    async with client_for([etcd.endpoint], timeout_s=2) as plaintext:
        with pytest.raises(aetcd.ClientError):
            await plaintext.get(b"/")
    no_certificate = Security(cluster.trust.mesh, cluster.trust.ca.read_bytes())
    async with client_for([etcd.endpoint], timeout_s=2, security=no_certificate) as anonymous:
        with pytest.raises(aetcd.ClientError):
            await anonymous.get(b"/")


async def test_insecure_mode_is_explicit_and_says_so(cluster: Cluster, tmp_path: Path) -> None:
    """The one test of ``--insecure``: plaintext etcd and gRPC, and a warning at start."""
    plain = EtcdMember("plain", tmp_path / "plain", free_port(), free_port())
    plain.start(tmp_path / "plain.log")
    try:
        plain.wait_healthy()
        agent = cluster.start(
            "open", insecure="true", etcd_endpoints=json.dumps([plain.endpoint]),
            tls_ca="", tls_cert="", tls_key="",
        )  # fmt: skip
        wait_log(agent, "INSECURE")
        async with MeshClient(agent.address, Security(insecure=True)) as client:
            assert [a.agent_id for a in await client.agents()] == ["open"]
        os.kill(agent.process.pid, signal.SIGTERM)
        agent.wait()
    finally:
        plain.stop()


def peer_port_answers(etcd: EtcdMember, ca: Path, cert: Path, key: Path) -> int | str:
    """``GET /members`` on etcd's peer (raft) port with this certificate: the HTTP status,
    or why the TLS handshake failed."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the member's name is not what is tried here
    context.load_cert_chain(str(cert), str(key))
    try:
        with urllib.request.urlopen(f"{etcd.peer_url}/members", context=context, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ssl.SSLError, ConnectionError) as exc:
        return f"refused: {exc}"


def test_etcds_peer_port_admits_its_members_only(
    etcd: EtcdMember, cluster: Cluster, tmp_path: Path
) -> None:
    """The outside review's probe: with any certificate of the mesh CA, the peer port
    answered ``/members`` and renewed leases (``/leases``), so a user could keep a dead
    agent's registration alive. It admits the members' peer name alone now."""
    trust = cluster.trust
    authority = Authority.load(trust.mesh, trust.root)
    key, cert = write_pair(tmp_path, "bob", authority.issue_user("bob", roles=["submitter"]))
    east = trust.agent("east-1", "east")
    member = trust.etcd("test", ["127.0.0.1"])
    assert peer_port_answers(etcd, trust.ca, member.cert, member.key) == 200  # the probe works
    for who, (c, k) in {"a user": (cert, key), "east's agent": (east.cert, east.key)}.items():
        answer = peer_port_answers(etcd, trust.ca, c, k)
        assert isinstance(answer, str), f"{who}'s certificate got {answer} from the peer port"


async def test_no_user_certificate_is_an_etcd_identity(
    etcd: EtcdMember, cluster: Cluster, tmp_path: Path
) -> None:
    """A user named ``operator`` would have been etcd's operator (etcd maps a client
    certificate's CN to its user): reserved names are refused, and a user's CN is
    ``user:<name>``, which no etcd user is."""
    authority = Authority.load(cluster.trust.mesh, cluster.trust.root)
    for name in ("operator", "root", "agent.west", "etcd-peer.gpumesh"):
        with pytest.raises(ConfigError, match="reserved"):
            authority.issue_user(name)
    key, cert = write_pair(tmp_path, "mallory", authority.issue_user("mallory"))
    mallory = Security.from_files(cluster.trust.mesh, cluster.trust.ca, cert, key)
    async with client_for([etcd.endpoint], timeout_s=2, security=mallory) as etcd_client:
        with pytest.raises(aetcd.ClientError):
            await etcd_client.get(b"/")
