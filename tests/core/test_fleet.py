"""How ``deploy.fleet`` reads a Compose file: interpolation, durations, profiles and the
order ``depends_on`` asks for, on the project's own file and on small ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.fleet import enabled, interpolated, order, seconds

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"


def test_variables_are_replaced_as_compose_replaces_them() -> None:
    env = {"IMAGE": "localhost/etcd:1", "EMPTY": ""}
    assert interpolated("${IMAGE:-quay.io/etcd}", env) == "localhost/etcd:1"
    assert interpolated("${MISSING:-quay.io/etcd}", env) == "quay.io/etcd"
    assert interpolated("${EMPTY:-fallback}", env) == "fallback"  # ":-" covers empty too
    assert interpolated("${MISSING}", env) == ""
    assert interpolated("for m in a b; do echo $$m; done", env) == "for m in a b; do echo $m; done"
    assert interpolated({"k": ["$${MEMBER}", 5]}, env) == {"k": ["${MEMBER}", 5]}


def test_durations() -> None:
    assert seconds("5s") == 5.0
    assert seconds("1m30s") == 90.0
    assert seconds("500ms") == 0.5
    assert seconds(2) == 2.0
    for bad in ("5", "5 s", "s", "1d"):
        with pytest.raises(ValueError, match="not a duration"):
            seconds(bad)


def test_dependencies_come_first_and_cycles_are_refused() -> None:
    services = {
        "app": {"depends_on": {"db": {"condition": "service_healthy"}}},
        "db": {"depends_on": {"init": {}}},
        "init": {},
    }
    assert order(services) == ["init", "db", "app"]
    with pytest.raises(ValueError, match="cycle: app -> db -> init -> db"):
        order({**services, "init": {"depends_on": {"db": {}}}})
    with pytest.raises(ValueError, match="app depends on cache, which is not enabled"):
        order({"app": {"depends_on": {"cache": {}}}})


def test_the_projects_file_runs_without_the_images_no_registry_serves() -> None:
    """Outside any profile: what the rehearsal can build (the agent image, and etcd by
    ETCD_IMAGE); the observability stack's public images only with its profile."""
    core = enabled(COMPOSE, frozenset(), {"ETCD_IMAGE": "localhost/gpumesh-etcd:x"})
    assert order(core["services"]) == [
        "pki", "etcd-0", "etcd-1", "etcd-2", "setup", "agent-1", "agent-2", "agent-3",
    ]  # fmt: skip
    images = {spec["image"] for spec in core["services"].values()}
    assert images == {"gpumesh:dev", "localhost/gpumesh-etcd:x"}
    everything = enabled(COMPOSE, frozenset({"observability"}), {})
    assert {"prometheus", "grafana", "otel-collector", "jaeger"} < set(everything["services"])
    assert everything["services"]["etcd-0"]["image"] == "quay.io/coreos/etcd:v3.5.17"
