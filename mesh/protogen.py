"""Regenerate the gRPC stubs in ``mesh/v1`` from ``proto/``: ``python -m mesh.protogen``.

The ``-I`` root is ``proto/`` so that the generated imports read ``from mesh.v1 import ...``,
which is exactly where the stubs live in the package. A test regenerates into a temporary
folder and compares, so stale stubs fail CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "mesh" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under ``out_root/mesh/v1`` and return their paths."""
    from grpc_tools import protoc  # dev-only dependency, imported where it is needed

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its output above")
    out = out_root / "mesh" / "v1"
    return sorted(p for p in out.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> None:
    written = generate(ROOT)
    for path in written:
        print(path.relative_to(ROOT))
    sys.exit(0)


if __name__ == "__main__":
    main()
