"""What ships in ``deploy/``: the systemd readiness protocol on a real agent, Kubernetes
manifests validated against the Kubernetes schemas, and a dashboard that only queries
metrics the agents export."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import aetcd
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import REGISTRY
from support import ROOT, Cluster

import mesh.metrics  # noqa: F401  (registers every metric the agents export)
from mesh.channels import Security
from mesh.local.etcdserver import EtcdMember
from mesh.local.trust import LocalTrust
from mesh.store.etcd import client_for
from mesh.store.topostore import token_keys

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
K8S_VERSION = "1.31.0"
# Kinds from CRDs (Prometheus operator, cert-manager): no schema ships for them.
CRD_KINDS = {"ServiceMonitor", "Certificate", "Issuer", "ClusterIssuer"}
CRD_GROUPS = {"monitoring.coreos.com", "cert-manager.io"}


def test_systemd_hears_ready_once_serving_then_stopping_while_draining(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.settimeout(30)  # a hang guard, not a measurement
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        agent = cluster.start("a1")
        ready = systemd.recv(4096).decode().splitlines()
        assert "READY=1" in ready and "STATUS=serving as a1 of west" in ready
        agent.signal(signal.SIGTERM)
        stopping = systemd.recv(4096).decode().splitlines()
        assert "STOPPING=1" in stopping
        assert any(line.startswith("STATUS=draining") for line in stopping)
        assert agent.wait() == 0


def test_the_systemd_unit_is_one_systemd_accepts(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the shipped unit (pointed at this install's
    ``mesh-agent``): any directive it cannot parse is a failure, not a warning."""
    binary = shutil.which("mesh-agent")
    assert binary, "mesh-agent is not installed"
    unit = (DEPLOY / "mesh-agent.service").read_text()
    assert "Type=notify" in unit
    (tmp_path / "mesh-agent.service").write_text(
        unit.replace("/opt/gpumesh/bin/mesh-agent", binary)
    )
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "mesh-agent.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


@pytest.mark.parametrize(
    ("name", "resource"),
    [(n, r) for n, r in manifests() if r["kind"] not in CRD_KINDS],
    ids=lambda v: v if isinstance(v, str) else v["kind"] + "/" + v["metadata"]["name"],
)
def test_every_manifest_is_valid_kubernetes_strictly(name: str, resource: dict) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_and_crds_are_well_formed() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for name, resource in manifests():
        if resource["kind"] in CRD_KINDS:
            assert resource["apiVersion"].split("/")[0] in {
                "monitoring.coreos.com",
                "cert-manager.io",
            }
            assert resource["metadata"]["name"] and resource["spec"], name


def by_kind(kind: str) -> list[dict]:
    return [r for _, r in manifests() if r["kind"] == kind]


def test_the_agent_daemonset_drains_before_kubernetes_kills_it() -> None:
    (daemonset,) = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (config,) = [c for c in by_kind("ConfigMap") if "agent.yaml" in c["data"]]
    agent = yaml.safe_load(config["data"]["agent.yaml"])
    assert pod["terminationGracePeriodSeconds"] > agent["drain_grace_s"] + agent["lease_ttl_s"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" in container["resources"]["limits"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "mesh.agent.probe" in " ".join(container[probe]["exec"]["command"])


def test_etcd_runs_three_members_with_tls_spread_and_protected() -> None:
    (etcd,) = by_kind("StatefulSet")
    assert etcd["spec"]["replicas"] == 3
    pod = etcd["spec"]["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]
    command = " ".join(pod["containers"][0]["command"])
    assert "--client-cert-auth" in command and "--peer-client-cert-auth" in command
    for flag in ("listen-client", "advertise-client", "listen-peer", "initial-advertise-peer"):
        assert f"--{flag}-urls=https://" in command  # only the metrics and probes are http
    (budget,) = by_kind("PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 2


# -- the dashboard ------------------------------------------------------------------------


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> set[str]:
    """Every series name the agents' registry can expose."""
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def test_every_dashboard_panel_queries_metrics_the_agents_export() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "gpumesh.json").read_text())
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"\bgpumesh_[a-z0-9_]+", target["expr"]))
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert queried, "the dashboard queries nothing"
    assert queried <= exported(), sorted(queried - exported())


def test_the_probe_reads_the_agents_config_and_says_whether_it_serves(
    cluster: Cluster, tmp_path: Path
) -> None:
    agent = cluster.start("a1")
    config = tmp_path / "agent.yaml"
    flags = cluster.argv("a1", "west")[3:]
    options = {
        k[2:].replace("-", "_"): yaml.safe_load(v)
        for k, v in zip(flags[::2], flags[1::2], strict=True)
    }
    options["listen"] = agent.address
    config.write_text(yaml.safe_dump(options))
    probe = [sys.executable, "-m", "mesh.agent.probe", "--config", str(config)]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (1, "NOT SERVING"), done.stderr


async def test_secure_etcd_confines_a_dcs_agents_and_publishes_the_token_key(
    etcd: EtcdMember, trust: LocalTrust
) -> None:
    """``meshctl pki secure-etcd`` as an operator runs it for a fleet's etcd: afterwards
    west's agents write west's keys only, and the token key is there to check tokens."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    meshctl = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "mesh.cli", "pki", "secure-etcd", "--endpoints", etcd.endpoint],
        *["--dc", "west", "--prefix", prefix, "--dir", str(trust.root)],
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(meshctl.communicate(), 120)  # a hang guard
    assert meshctl.returncode == 0, err.decode()
    files = trust.agent("w1", "west")
    west = Security.from_files(trust.mesh, files.ca, files.cert, files.key)
    async with client_for([etcd.endpoint], security=west) as agent:
        await agent.put(f"/{prefix}/west/probe".encode(), b"1")
        with pytest.raises(aetcd.ClientError):
            await agent.put(f"/{prefix}/east/probe".encode(), b"1")
        assert await agent.get_prefix(token_keys(prefix))


# -- compose ------------------------------------------------------------------------------


def test_the_compose_file_follows_the_compose_specification() -> None:
    """Checked against the Compose Specification's JSON Schema (``tests/data``, from
    compose-spec/compose-spec, Apache-2.0): the whole file, the observability profile
    included, which cannot run here (its public images); the rest runs in
    ``test_rehearse.py``."""
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)  # the draft its $schema names
    services = compose["services"]
    assert {"etcd-0", "etcd-1", "etcd-2", "prometheus", "grafana", "jaeger"} <= services.keys()
    assert {"otel-collector", "agent-1", "agent-2", "agent-3"} <= services.keys()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
    build = services["agent-1"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).exists()
    for agent in ("agent-1", "agent-2", "agent-3"):
        assert services[agent]["environment"]["MESH_FAKE_GPUS"]
        assert all("/pki" not in str(v) for v in services[agent]["environment"].values())
