"""The stubs in ``mesh/v1`` must be what ``proto/`` generates today."""

from __future__ import annotations

from pathlib import Path

from mesh.protogen import ROOT, generate


def test_stubs_are_not_stale(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    stale = [
        p.name for p in fresh if (ROOT / "mesh" / "v1" / p.name).read_bytes() != p.read_bytes()
    ]
    committed = sorted(
        p.name
        for p in (ROOT / "mesh" / "v1").iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    )
    assert stale == [], "stubs differ from proto/: run python -m mesh.protogen"
    assert committed == sorted(p.name for p in fresh), "stubs without a .proto, or missing"
