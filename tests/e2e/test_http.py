"""HTTP/JSON on a real agent, over real TLS: every public RPC has a route, the routes
answer as gRPC does (same identities, same roles, grpc-gateway's statuses), Watch is
Server-Sent Events, and the OpenAPI document is generated from the protos."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import ssl
from pathlib import Path

import aiohttp
import pytest
from openapi_spec_validator import validate
from support import ROOT, AgentProc, Cluster, eventually, until_peers

from mesh.agent.http.openapi import document
from mesh.agent.http.routes import ROUTES, public_rpcs
from mesh.config import AgentConfig
from mesh.core.access import OPERATOR, READER, SUBMITTER


def test_every_public_rpc_has_a_route_and_the_document_is_valid_openapi() -> None:
    routed = {route.rpc for route in ROUTES}
    assert set(public_rpcs()) <= routed, sorted(set(public_rpcs()) - routed)
    spec = document()
    validate(spec)
    operations = {op["x-grpc-method"] for path in spec["paths"].values() for op in path.values()}
    assert operations == routed
    spec_schema = spec["components"]["schemas"]["mesh.v1.TaskSpec"]["properties"]
    assert spec_schema["payload"] == {"type": "string", "format": "byte"}
    assert spec_schema["taskType"]["enum"][0] == "TASK_TYPE_UNSPECIFIED"


class Http:
    """An HTTPS client of one agent, checking its certificate against the mesh's CA."""

    def __init__(self, agent: AgentProc, cluster: Cluster, token: str | None) -> None:
        self.base = agent.http_url
        self.tls = ssl.create_default_context(cafile=str(cluster.trust.ca))
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, verb: str, path: str, **kw: object) -> tuple[int, dict, dict]:
        headers = {**self.headers, **kw.pop("headers", {})}  # type: ignore[dict-item]
        async with (
            aiohttp.ClientSession() as session,
            session.request(verb, self.base + path, ssl=self.tls, headers=headers, **kw) as reply,
        ):
            text = await reply.text()
            whole = "json" in reply.content_type and "ndjson" not in reply.content_type
            body = json.loads(text) if whole else {"raw": text}
            return reply.status, body, dict(reply.headers)


@pytest.fixture
async def agent(cluster: Cluster) -> AgentProc:
    started = cluster.start("h1", http_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    await until_peers(started, ["h1"])
    return started


async def test_submit_get_list_watch_and_cancel_as_grpc_does(
    agent: AgentProc, cluster: Cluster
) -> None:
    user = Http(agent, cluster, cluster.security.token)
    spec = {
        "taskId": "h-1",
        "pipeline": "echo",
        "model": "m",
        "payload": base64.b64encode(b"hi").decode(),
        "params": {"media_type": "text/plain"},
    }
    status, body, headers = await user.call("POST", "/v1/tasks", json={"spec": spec})
    assert status == 200, body
    assert body["status"]["taskId"] == "h-1"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "Set-Cookie" not in headers and "Access-Control-Allow-Origin" not in headers

    async with aiohttp.ClientSession() as session:  # Server-Sent Events to the end
        url = f"{user.base}/v1/tasks/h-1:watch"
        options = {"ssl": user.tls, "headers": user.headers}
        async with session.get(url, **options) as stream:
            assert stream.content_type == "text/event-stream"
            events = []
            async for line in stream.content:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
    assert events[-1]["status"]["state"] == "TASK_STATE_SUCCEEDED"

    status, body, _ = await user.call("GET", "/v1/tasks/h-1")
    assert (status, body["state"]) == (200, "TASK_STATE_SUCCEEDED"), body
    status, body, headers = await user.call("GET", "/v1/tasks/h-1:result")
    assert (status, body["raw"], headers["Content-Type"]) == (200, "hi", "text/plain")
    status, body, _ = await user.call("GET", "/v1/tasks?state=TASK_STATE_SUCCEEDED")
    assert [t["taskId"] for t in body["tasks"]] == ["h-1"]
    status, body, _ = await user.call("POST", "/v1/tasks/h-1:rerun", json={"newTaskId": "h-1b"})
    assert status == 200 and body["status"]["spec"]["rerunOf"] == "h-1", body

    # The payload as the raw body: the spec's fields from the query string.
    raw = {"pipeline": "sleep", "model": "m", "taskId": "h-2", "params.seconds": "30"}
    status, body, _ = await user.call(
        "POST", "/v1/tasks", params=raw, data=b"\x00\x01",
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert status == 200, body
    status, body, _ = await user.call("POST", "/v1/tasks/h-2:cancel", json={"reason": "no"})
    assert status == 200, body


async def test_errors_carry_grpc_gateways_statuses(agent: AgentProc, cluster: Cluster) -> None:
    anonymous = Http(agent, cluster, None)
    status, body, _ = await anonymous.call("GET", "/v1/agents")
    assert status == 401 and body["code"] == 16 and "Bearer" in body["message"]
    forged = Http(agent, cluster, "not.a.token")
    assert (await forged.call("GET", "/v1/agents"))[0] == 401
    reader = Http(agent, cluster, cluster.trust.token("rita", roles=[READER]))
    status, body, _ = await reader.call("POST", "/v1/agents/self:drain", json={})
    assert (status, body["code"]) == (403, 7)
    user = Http(agent, cluster, cluster.security.token)
    assert (await user.call("GET", "/v1/tasks/nope"))[0] == 404
    status, body, _ = await user.call("POST", "/v1/tasks", data=b"{not json")
    assert status == 400 and body["code"] == 3
    status, body, _ = await user.call("POST", "/v1/tasks", json={"spec": {"pipeline": "echo"}})
    assert status == 400, body
    status, body, _ = await user.call("POST", "/v1/tasks", json={"spec": {"gpuCount": -1}})
    assert status == 400, body
    status, body, _ = await user.call("GET", "/v1/traces/../../etc")
    assert status in (400, 404)


async def test_agents_route_openapi_and_drain(agent: AgentProc, cluster: Cluster) -> None:
    operator = Http(agent, cluster, cluster.trust.token("olga", roles=[OPERATOR]))
    status, body, _ = await operator.call("GET", "/v1/agents")
    (info,) = body["agents"]
    assert info["httpUrl"] == agent.http_url and info["agentId"] == "h1"
    async with aiohttp.ClientSession() as session, session.get(info["metricsUrl"]) as metrics:
        assert "gpumesh_agent_info" in await metrics.text()
    status, body, _ = await operator.call("GET", "/v1/route?spec.model=m&spec.pipeline=echo")
    assert status == 200 and body["targets"][0]["name"] == "h1"
    status, body, _ = await operator.call("GET", "/v1/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.")
    status, body, _ = await operator.call("POST", "/v1/agents/self:drain", json={})
    assert (status, body["state"]) == (200, "draining")


README = ROOT / "README.md"


def curl_examples() -> list[str]:
    """The README's curl examples, one shell command each (continuations joined)."""
    block = README.read_text().split("<!-- curl-examples")[1].split("<!-- /curl-examples")[0]
    code = block.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line for line in code.splitlines() if not line.startswith("export ")]


async def test_the_readmes_curl_examples_work(agent: AgentProc, cluster: Cluster) -> None:
    env = {
        **os.environ,
        "CA": str(cluster.trust.ca),
        "AGENT": agent.http_url,
        "TOKEN": cluster.trust.token("alice"),
    }
    outputs = []
    for command in curl_examples():
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", command, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(shell.communicate(), 60)  # a hang guard
        assert shell.returncode == 0, (command, err)
        outputs.append(out.decode())
    submitted, watched, result, raw, listed, streamed, agents, openapi = outputs
    assert json.loads(submitted)["status"]["taskId"] == "hello-1"
    assert "TASK_STATE_SUCCEEDED" in watched.split("event: state")[-1]
    assert result == "hi"
    assert json.loads(raw)["status"]["spec"]["pipeline"] == "echo"
    assert "hello-1" in [t["taskId"] for t in json.loads(listed)["tasks"]]
    answers = [json.loads(line) for line in streamed.splitlines()]
    assert sorted((a["ref"], next(k for k in a if k != "ref")) for a in answers) == [
        ("a", "ended"), ("a", "submitted"), ("b", "submitted"),
    ]  # fmt: skip
    assert [a["agentId"] for a in json.loads(agents)["agents"]] == ["h1"]
    assert json.loads(openapi)["openapi"].startswith("3.")


async def test_a_users_trace_is_read_by_its_user_alone(cluster: Cluster, tmp_path: Path) -> None:
    """The outside review read 11 spans of another user's task by its trace id (trace
    ids are exemplars on every agent's /metrics): a trace is read as its task is."""
    agent = cluster.start(
        "h-tr", http_listen="127.0.0.1:0", span_dir=tmp_path / "spans", trace_sample_ratio=1
    )
    await until_peers(agent, ["h-tr"])
    alice = Http(agent, cluster, cluster.trust.token("alice", roles=[SUBMITTER]))
    bob = Http(agent, cluster, cluster.trust.token("bob", roles=[SUBMITTER]))
    operator = Http(agent, cluster, cluster.security.token)
    spec = {"taskId": "h-traced", "pipeline": "echo", "model": "m", "payload": "aGk="}
    status, body, _ = await alice.call("POST", "/v1/tasks", json={"spec": spec})
    assert status == 200, body
    trace = body["status"]["traceId"]

    async def spans_written() -> bool:
        status, body, _ = await operator.call("GET", f"/v1/traces/{trace}")
        return status == 200 and len(body["spans"]) > 0

    await eventually(spans_written, what="the task's spans in the span files")
    status, body, _ = await bob.call("GET", f"/v1/traces/{trace}")
    assert (status, body.get("code")) == (403, 7), body
    assert "spans" not in body
    status, body, _ = await alice.call("GET", f"/v1/traces/{trace}")
    assert status == 200 and body["spans"], body
    unknown = "0" * 32  # a trace of no task this mesh knows is nobody's to read
    assert (await bob.call("GET", f"/v1/traces/{unknown}"))[0] == 403


async def test_hostile_bodies_get_precise_statuses(agent: AgentProc, cluster: Cluster) -> None:
    """Each answered 500 before (one with a broken response a pooling proxy would carry
    into the next): a body over the limit, a media type with CR/LF, a resume token
    past int64."""
    user = Http(agent, cluster, cluster.security.token)
    huge = io.BytesIO(b"x" * (agent_max_body(agent) + 1))
    status, body, _ = await user.call(
        "POST", "/v1/tasks", data=huge, headers={"Content-Type": "application/json"}
    )
    assert (status, body["code"]) == (413, 8), body
    spec = {"taskId": "h-crlf", "pipeline": "echo", "model": "m", "payload": "aGk=",
            "params": {"media_type": "text/plain\r\nX-Injected: 1"}}  # fmt: skip
    status, body, _ = await user.call("POST", "/v1/tasks", json={"spec": spec})
    assert (status, body["code"]) == (400, 3), body
    assert "media_type" in body["message"]
    status, body, _ = await user.call("GET", "/v1/tasks/h-1:watch?resumeToken=west:" + "9" * 23)
    assert (status, body["code"]) == (400, 3), body


def agent_max_body(agent: AgentProc) -> int:
    """The gateway's body limit for the test agents' payload limit (the defaults')."""
    return AgentConfig.model_fields["max_payload_bytes"].default * 2 + 65536


async def test_a_stream_of_submits_is_ndjson_both_ways(agent: AgentProc, cluster: Cluster) -> None:
    """Each line a SubmitStreamRequest, each answer a line as it comes: a task refused
    alone, the others answered and followed to their end; a line that is no request
    ends the stream with an error line after what came before it."""
    user = Http(agent, cluster, cluster.security.token)

    def line(task_id: str, pipeline: str = "echo") -> str:
        spec = {"taskId": task_id, "pipeline": pipeline, "model": "m", "payload": "aGk="}
        return json.dumps({"spec": spec, "ref": task_id, "follow": True})

    body = "\n".join([line("nd-1"), line("nd-bad", "nope"), "", line("nd-2")]) + "\n"
    headers = {"Content-Type": "application/x-ndjson"}
    status, reply, got = await user.call("POST", "/v1/tasks:stream", data=body, headers=headers)
    assert status == 200 and got["Content-Type"] == "application/x-ndjson"
    answers = [json.loads(text) for text in reply["raw"].splitlines()]
    kinds = {(a["ref"], next(k for k in a if k != "ref")) for a in answers}
    assert kinds == {
        ("nd-1", "submitted"), ("nd-1", "ended"), ("nd-2", "submitted"), ("nd-2", "ended"),
        ("nd-bad", "error"),
    }  # fmt: skip
    ended = [a["ended"] for a in answers if "ended" in a]
    assert {e["state"] for e in ended} == {"TASK_STATE_SUCCEEDED"}
    status, reply, _ = await user.call(
        "POST", "/v1/tasks:stream", data=line("nd-3") + "\n{not json\n", headers=headers
    )
    *_, last = [json.loads(text) for text in reply["raw"].splitlines()]
    assert last["error"]["code"] == 3 and "line 2" in last["error"]["message"]
    reader = Http(agent, cluster, cluster.trust.token("ro", roles=[READER]))
    status, refused, _ = await reader.call("POST", "/v1/tasks:stream", data=line("nd-4"))
    assert status == 403 and refused["code"] == 7
