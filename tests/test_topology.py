"""The topology file: the shipped one loads; a bad one says where it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.topology import load

SHIPPED = Path(__file__).resolve().parent.parent / "topology" / "local.yaml"


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
