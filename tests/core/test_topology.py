"""The topology file: the shipped one loads; a bad one says where it is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import ROOT

from mesh.errors import ConfigError
from mesh.topology import load

SHIPPED = ROOT / "topology" / "local.yaml"


def test_shipped_local_topology_loads() -> None:
    topology = load(SHIPPED)
    assert set(topology.dcs) == {"west", "east"}
    assert topology.local is not None
    assert all(len(agents) >= 2 for agents in topology.local.agents.values())


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("dcs: {}", "dcs"),
        ("dcs: {West: {etcd: ['h:1']}}", "dcs.West"),
        ("dcs: {w: {etcd: []}}", "dcs.w.etcd"),
        ("dcs: {w: {etcd: ['h:1']}}\nqueues: {vip: 0}", "queues.vip"),
        ("dcs: {w: {etcd: ['h:1']}}\nlocal: {agents: {e: []}}", "local.agents.e: no such DC"),
        ("dcs: {w: {etcd: ['h:1']}}\ncolour: blue", "colour"),
        ("- a list", "mapping"),
        ("dcs: [unclosed", "not valid YAML"),
    ],
)
def test_problems_name_their_place(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert words in caught.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "none.yaml")


def test_json_schema_file_is_in_step_with_the_model() -> None:
    from mesh.topology import schema

    shipped = json.loads((SHIPPED.parent / "schema.json").read_text())
    assert shipped == schema(), "regenerate: meshctl topology schema > topology/schema.json"


def test_three_dc_example_loads() -> None:
    topology = load(SHIPPED.parent / "three-dc.yaml")
    assert [o.dc for o in topology.dcs["eu-west"].overflow] == ["eu-central", "us-east"]
    assert topology.queues["batch"] == 1


@pytest.mark.parametrize(
    ("overflow", "words"),
    [
        ("[{dc: mars}]", "dcs.w.overflow: 'mars' is not a DC"),
        ("[{dc: w}]", "dcs.w.overflow: a DC cannot overflow to itself"),
        ("[{dc: e}, {dc: e}]", "dcs.w.overflow: 'e' listed twice"),
        ("[{dc: e, weight: 0}]", "dcs.w.overflow.0.weight"),
    ],
)
def test_overflow_problems(tmp_path: Path, overflow: str, words: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"dcs: {{w: {{etcd: ['h:1'], overflow: {overflow}}}, e: {{etcd: ['h:2']}}}}")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert words in caught.value.message
