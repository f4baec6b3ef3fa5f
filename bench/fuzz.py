"""``python -m bench fuzz [--examples N] [--json]``: hypothesis against a live agent.

Five campaigns, each ``N`` generated cases: Submits with any value in any field of
``TaskSpec`` (as a submitter), Offers with any value in any field of ``Envelope`` (as an
agent of another DC, with a real certificate), stage requests, raw gossip datagrams
(random bytes, and frames signed with the mesh's key but bent in every field), and HTTP
requests to the gateway (any route, verb, path segment, query, body and content type,
as a submitter). Every gRPC answer must be a precise status (never INTERNAL or UNKNOWN)
within its timeout, every HTTP answer a status under 500 with a JSON error body, and
after the datagrams the agent must still answer its health check and count none of them
as an internal error. The tests run a few hundred of each; this runs thousands.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.agent.http.routes import ROUTES
from mesh.channels import Security
from mesh.gossip.wire import Keyring, Kind, encode
from mesh.trust.pki import agent_host
from mesh.v1 import peer_pb2, peer_pb2_grpc, tasks_pb2_grpc
from mesh.v1 import tasks_pb2 as pb

PRECISE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
T = TypeVar("T")
CALL_TIMEOUT_S = 10.0  # an answer later than this is a hang
MAX_MESSAGE = 8 * 1024 * 1024

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=160)
names = st.one_of(text, st.sampled_from(["sleep", "echo", "command", "m", "normal", "vip", ""]))
uint32 = st.integers(0, 2**32 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def specs(draw: st.DrawFn, user: str = "fuzzer") -> pb.TaskSpec:
    """Any spec; most name the caller (or nobody), so validation beyond the owner runs."""
    owner = draw(st.one_of(st.just(pb.User()), st.just(pb.User(id=user)), st.builds(
        pb.User, id=text, group=text, role=text)))  # fmt: skip
    spec = pb.TaskSpec(
        task_id=draw(st.one_of(text, st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True))),
        user=owner,
        task_type=draw(st.integers(-(2**31), 2**31 - 1)),
        pipeline=draw(names),
        model=draw(names),
        queue=draw(names),
        payload=draw(st.binary(max_size=4096)),
        params=draw(st.dictionaries(text, text, max_size=8)),
        affinity_key=draw(text),
        gpu_count=draw(uint32),
        min_gpu_memory_mb=draw(st.integers(0, 2**64 - 1)),
    )
    when = draw(st.sampled_from(["none", "deadline", "timeout"]))
    if when == "deadline":
        spec.deadline.seconds, spec.deadline.nanos = draw(int64), draw(st.integers(0, 999_999_999))
    elif when == "timeout":
        spec.timeout.seconds = draw(st.integers(-(10**12), 10**12))
    return spec


@st.composite
def envelopes(draw: st.DrawFn, origin_dc: str) -> peer_pb2.Envelope:
    return peer_pb2.Envelope(
        spec=draw(specs()),
        path=draw(st.lists(text, max_size=20)),
        hops=draw(uint32),
        deadline_unix_ms=draw(int64),
        attempt=draw(uint32),
        entry_agent=draw(text),
        max_tasks=draw(st.floats(allow_nan=True, allow_infinity=True)),
        origin_dc=draw(st.one_of(st.just(origin_dc), st.just(origin_dc), text)),
    )


@st.composite
def stages(draw: st.DrawFn, admitted: pb.TaskSpec) -> peer_pb2.StageRequest:
    """Any stage request, or one around a spec as admitted (a sleep task's, 10 ms of work)
    with any ``layers`` and a block of them near the model's, so the layer bounds, the
    input's check and the GPU's lending are reached too."""
    few = st.integers(0, 16)
    if draw(st.booleans()):
        spec = pb.TaskSpec()
        spec.CopyFrom(admitted)
        spec.params["layers"] = draw(st.one_of(few.map(str), text, st.integers(-5, 2000).map(str)))
        first = draw(few)
        after = st.one_of(st.just(first), few, int64).map(lambda n: {"layers_run": n})
        data = b"" if first == 0 else json.dumps(draw(after)).encode()
        return peer_pb2.StageRequest(
            spec=spec, attempt=draw(st.integers(1, 3)), first=first, count=draw(few), input=data
        )
    run = st.one_of(int64, few).map(lambda n: json.dumps({"layers_run": n}).encode())
    return peer_pb2.StageRequest(
        spec=draw(specs()),
        attempt=draw(st.one_of(uint32, few)),
        first=draw(st.one_of(uint32, few)),
        count=draw(st.one_of(uint32, few)),
        input=draw(st.one_of(st.binary(max_size=256), run)),
    )


@st.composite
def datagrams(draw: st.DrawFn, keyring: Keyring, members: list[str]) -> bytes:
    """Random bytes, or a frame signed with the mesh's key and bent anywhere."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=1500))
    leaf = st.one_of(st.integers(-(2**63), 2**64 - 1), text, st.binary(max_size=64), st.none())
    payload = draw(
        st.dictionaries(
            st.sampled_from(["own", "digest", "states", "want", "junk"]),
            st.recursive(leaf, lambda inner: st.lists(inner, max_size=12), max_leaves=40),
            max_size=5,
        )
    )
    return encode(
        keyring,
        draw(st.sampled_from(list(Kind))),
        draw(st.one_of(st.sampled_from(members), text)),
        draw(st.integers(0, 2**63)),
        draw(st.integers(0, 2**63)),
        int(time.time() * 1000) + draw(st.integers(-60_000, 60_000)),
        payload,
    )


HTTP_PATHS = [route.path for route in ROUTES] + ["/v1/traces/{task_id}", "/v1/openapi.json"]
HTTP_FIELDS = ["taskId", "pipeline", "model", "queue", "params.seconds", "state", "limit",
               "pageToken", "userId", "resumeToken", "explain", "spec.model"]  # fmt: skip
json_leaf = st.one_of(st.none(), st.booleans(), int64, st.floats(), text)
json_keys = st.one_of(text, st.sampled_from(HTTP_FIELDS))
json_values = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(json_keys, inner, max_size=6)
    ),
    max_leaves=30,
)


@dataclass(frozen=True)
class HttpCase:
    verb: str
    path: str
    body: bytes
    content_type: str


@st.composite
def http_cases(draw: st.DrawFn) -> HttpCase:
    """Any route with any path segment, query, verb, body and content type."""
    segment = draw(st.one_of(text, st.from_regex(r"[A-Za-z0-9._:-]{1,40}", fullmatch=True)))
    path = draw(st.sampled_from(HTTP_PATHS))
    for name in ("{task_id}", "{group}"):
        path = path.replace(name, urllib.parse.quote(segment, safe=""))
    query = draw(st.dictionaries(st.one_of(st.sampled_from(HTTP_FIELDS), text), text, max_size=5))
    if query:
        path += "?" + urllib.parse.urlencode(query)
    body = draw(st.one_of(
        st.binary(max_size=2048),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.builds(lambda spec: json.dumps({"spec": spec}).encode(), json_values),
    ))  # fmt: skip
    verb = draw(st.sampled_from(["GET", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"]))
    kind = draw(st.sampled_from(["application/json", "application/octet-stream", "text/plain", ""]))
    return HttpCase(verb, path, body, kind)


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _channel(address: str, security: Security, dc: str = "") -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.ssl_target_name_override", agent_host(security.mesh, dc)),
    ]
    return grpc.secure_channel(address, security.credentials(), options)


def _answer(tally: Tally, what: str, call: Callable[[], object]) -> None:
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code not in PRECISE or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.failures.append(f"{what}: {code.name}: {exc.details()}")  # type: ignore[attr-defined]
    tally.statuses[f"{what} {code.name}"] += 1


def _campaign(examples: int, strategy: st.SearchStrategy[T], send: Callable[[T], None]) -> None:
    """``send`` each of ``examples`` cases of ``strategy``, the same cases in every run."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def case(value: T) -> None:
        send(value)

    case()


def fuzz_submit(address: str, user: Security, examples: int, tally: Tally) -> None:
    with _channel(address, user) as channel:
        submit = tasks_pb2_grpc.TaskServiceStub(channel).Submit
        _campaign(examples, specs(), lambda spec: _answer(
            tally, "Submit", lambda: submit(pb.SubmitRequest(spec=spec), timeout=CALL_TIMEOUT_S)
        ))  # fmt: skip


def fuzz_offer(
    peer_address: str, agent: Security, dc: str, origin: str, examples: int, tally: Tally
) -> None:
    with _channel(peer_address, agent, dc) as channel:
        offer = peer_pb2_grpc.PeerServiceStub(channel).Offer
        _campaign(examples, envelopes(origin), lambda envelope: _answer(
            tally, "Offer", lambda: offer(envelope, timeout=CALL_TIMEOUT_S)
        ))  # fmt: skip


def fuzz_stage(
    address: str, peer_address: str, agent: Security, user: Security, examples: int, tally: Tally
) -> None:
    """Stage requests from an agent of the DC (so they get past who may send one), half
    around the spec of a task ``user`` submits first (so they get past its checks too)."""
    first = pb.TaskSpec(pipeline="sleep", model="m", params={"seconds": "0.01", "steps": "1"})
    with _channel(address, user) as channel:
        submit = tasks_pb2_grpc.TaskServiceStub(channel).Submit
        admitted = submit(pb.SubmitRequest(spec=first), timeout=CALL_TIMEOUT_S).status.spec
    with _channel(peer_address, agent) as channel:
        run_stage = peer_pb2_grpc.PeerServiceStub(channel).RunStage
        _campaign(examples, stages(admitted), lambda request: _answer(
            tally, "RunStage", lambda: run_stage(request, timeout=CALL_TIMEOUT_S)
        ))  # fmt: skip


def fuzz_gossip(
    gossip_address: str, keyring: Keyring, members: list[str], examples: int, tally: Tally
) -> None:
    host, _, port = gossip_address.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:

        def send(data: bytes) -> None:
            sock.sendto(data, (host, int(port)))
            tally.statuses["datagram sent"] += 1

        _campaign(examples, datagrams(keyring, members), send)


def fuzz_http(http_url: str, ca: bytes, token: str, examples: int, tally: Tally) -> None:
    """Requests to the HTTP gateway: every answer under 500, and an error's body JSON. A
    stream's status is checked, its body not read (a watch lasts as long as its task)."""
    host, _, port = urllib.parse.urlsplit(http_url).netloc.rpartition(":")
    context = ssl.create_default_context(cadata=ca.decode())

    def send(case: HttpCase) -> None:
        connection = http.client.HTTPSConnection(
            host, int(port), context=context, timeout=CALL_TIMEOUT_S
        )
        headers = {"Authorization": f"Bearer {token}"}
        if case.content_type:
            headers["Content-Type"] = case.content_type
        what = f"HTTP {case.verb}"
        try:
            connection.request(case.verb, case.path, body=case.body, headers=headers)
            reply = connection.getresponse()
            streamed = reply.getheader("Content-Type", "").startswith("text/event-stream")
            body = b"" if streamed or reply.status < 400 else reply.read()
        except (OSError, http.client.HTTPException) as exc:
            tally.failures.append(f"{what} {case.path[:80]!r}: {type(exc).__name__}: {exc}")
            tally.statuses[f"{what} broken"] += 1
            return
        finally:
            connection.close()
        tally.statuses[f"{what} {reply.status}"] += 1
        if reply.status >= 500:
            tally.failures.append(f"{what} {case.path[:80]!r}: {reply.status} {body[:200]!r}")
        elif reply.status >= 400:
            try:
                json.loads(body)
            except ValueError:
                tally.failures.append(f"{what} {case.path[:80]!r}: {reply.status}, no JSON body")

    _campaign(examples, http_cases(), send)


def still_well(address: str, anyone: Security, metrics_url: str | None, tally: Tally) -> None:
    """After the storm: the agent answers its health check, and no datagram was an
    internal error (its handler raised) rather than a reasoned drop."""
    with _channel(address, anyone) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        tally.failures.append("the agent stopped serving")
    if metrics_url:
        with urllib.request.urlopen(metrics_url, timeout=5) as page:
            found = re.search(
                r'gpumesh_gossip_dropped_total\{reason="internal"\} (\d+)', page.read().decode()
            )
        if found and int(found[1]):
            tally.failures.append(f"{found[1]} datagram(s) raised inside the agent")


def main(argv: list[str]) -> None:
    from bench.localdc import one_dc

    parser = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__)
    parser.add_argument("--examples", type=int, default=3000, help="cases per campaign")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    agents = [{"id": "fuzzed", "fake_gpus": "2xA100-80GB"}]
    tally = Tally()
    started = time.monotonic()
    with one_dc("fuzz", agents, timeout_s=60) as mesh:
        assert mesh.trust is not None
        agent = next(s for s in mesh.started if s.kind == "agent")
        trust = mesh.trust
        fuzz_submit(agent.address, trust.user("fuzzer"), args.examples, tally)
        files = trust.agent("elsewhere-1", "elsewhere")
        other = Security.from_files(trust.mesh, files.ca, files.cert, files.key)
        fuzz_offer(agent.peer_address, other, "dc", "elsewhere", args.examples, tally)
        files = trust.agent("peer-1", "dc")
        peer = Security.from_files(trust.mesh, files.ca, files.cert, files.key)
        user = trust.user("fuzzer")
        fuzz_stage(agent.address, agent.peer_address, peer, user, args.examples, tally)
        keyring = Keyring((trust.gossip_key_file.read_text().split()[0].encode(),))
        gossip = mesh.gossip_address(agent.name)
        fuzz_gossip(gossip, keyring, [agent.name], args.examples, tally)
        http_token = trust.user("fuzzer").token
        assert http_token is not None
        fuzz_http(agent.http_url, trust.ca.read_bytes(), http_token, args.examples, tally)
        still_well(agent.address, Security(trust.mesh, trust.ca.read_bytes()), None, tally)
    result = {
        "examples_per_campaign": args.examples,
        "statuses": dict(sorted(tally.statuses.items())),
        "failures": tally.failures[:20],
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for name, count in result["statuses"].items():
            print(f"{count:>7}  {name}")
        print(f"failures: {len(tally.failures)}; {result['seconds']} s")
    raise SystemExit(1 if tally.failures else 0)
