"""``python -m deploy.image [--base IMAGE | --mmdebstrap] [--tag T] [--json]``: the agent
image from ``deploy/Dockerfile``, built through the container engine's API.

The project and its dependencies go in as wheels made on the host (``build/wheels``): the
project's own wheel, and every dependency's for the image's Python (CPython 3.11 on
manylinux x86-64), whatever Python runs this. The build then needs no network. The base
is a build argument: the public ``python:3.11-slim`` by default; ``--mmdebstrap`` makes a
Debian bookworm base with Python from Debian's mirror instead (``mmdebstrap``, then an
import: no image registry), reused once made. Prints the image's size and how long each
step took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.engine import LABEL, Engine, require, serving

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "build" / "wheels"
DEFAULT_BASE = "python:3.11-slim"
DEBIAN_BASE = "localhost/gpumesh-base:bookworm"
AGENT_TAG = "gpumesh:dev"
# The image's Python, whatever runs this: wheels for it, not for the host.
TARGET = [
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64", "--only-binary", ":all:",
]  # fmt: skip
SLIM = ["--dpkgopt=path-exclude=/usr/share/" + d + "/*" for d in ("doc", "man", "info", "locale")]


@dataclass(frozen=True)
class Built:
    tag: str
    base: str
    size_mb: float
    wheels_s: float
    base_s: float
    build_s: float


def wheels(into: Path = WHEELS) -> Path:
    """The project's wheel and its dependencies' for the image, in ``into`` (afresh)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(into), str(ROOT)], check=True)
    (project,) = into.glob("gpumesh-*.whl")
    subprocess.run([*pip, "download", *TARGET, "-d", str(into), str(project)], check=True)
    return into


def debian_base(engine: Engine, tag: str = DEBIAN_BASE) -> str:
    """A Debian bookworm image with Python 3.11, made by ``mmdebstrap`` from Debian's
    mirror and imported: no registry. Made once; the tag is reused after."""
    if engine.image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory() as scratch:
        rootfs = Path(scratch) / "rootfs.tar"
        include = "--include=python3,python3-venv,ca-certificates"
        argv = ["mmdebstrap", "--quiet", "--variant=minbase", include, *SLIM]
        subprocess.run([*argv, "bookworm", str(rootfs)], check=True)
        reply = engine.client.api.import_image(src=str(rootfs))
    # Some engines (podman) ignore the tag asked for at import: tag the id it answered.
    image_id = json.loads(reply.splitlines()[-1])["id"] if isinstance(reply, str) else reply
    repository, _, version = tag.rpartition(":")
    engine.client.images.get(image_id).tag(repository, version)
    return tag


def agent_image(engine: Engine, base: str, tag: str = AGENT_TAG) -> str:
    """Build ``deploy/Dockerfile`` on ``base`` from the wheels in ``build/wheels``: only
    the Dockerfile and the wheels are sent to the engine."""
    context = {"deploy/Dockerfile": ROOT / "deploy" / "Dockerfile", "build/wheels": WHEELS}
    engine.build(
        context,
        tag,
        dockerfile="deploy/Dockerfile",
        buildargs={"BASE": base},
        labels={LABEL: "agent"},
        network_mode="none",
    )
    return tag


def build(engine: Engine, base: str | None, tag: str = AGENT_TAG) -> Built:
    """Wheels, the base (``None``: made with mmdebstrap), then the agent image; timed."""
    started = time.monotonic()
    wheels()
    made = time.monotonic()
    base = base or debian_base(engine)
    based = time.monotonic()
    agent_image(engine, base, tag)
    done = time.monotonic()
    size = engine.client.images.get(tag).attrs.get("Size", 0) / 1e6
    return Built(
        tag, base, round(size, 1), round(made - started, 1), round(based - made, 1),
        round(done - based, 1),
    )  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.image", description=__doc__)
    bases = parser.add_mutually_exclusive_group()
    bases.add_argument("--base", default=DEFAULT_BASE, help="the base image (needs Python 3.11)")
    bases.add_argument("--mmdebstrap", action="store_true", help="make a Debian base here")
    parser.add_argument("--tag", default=AGENT_TAG)
    parser.add_argument("--wheels-only", action="store_true", help="only make build/wheels")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.wheels_only:
        print(wheels())
        return
    with serving() as engine:
        built = build(
            require(engine, "the image"), None if args.mmdebstrap else args.base, args.tag
        )
    if args.json:
        print(json.dumps(asdict(built)))
        return
    for name, value in asdict(built).items():
        print(f"{name:>8}: {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
