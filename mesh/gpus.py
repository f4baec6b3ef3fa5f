"""What GPUs this agent has, and how much each class of GPU weighs on the ring.

The inventory comes from NVML (``pynvml``, shipped by ``nvidia-ml-py``) where a driver is
present; otherwise from a declared fake (``--fake-gpus 2xA100-80GB,1xA40-48GB``) so that
machines without a GPU can still run the mesh, its tests and its demo.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import pynvml

from mesh.errors import ConfigError

log = logging.getLogger(__name__)

# Relative throughput for diffusion/LLM inference, H100 = 1.0. Rough public figures; an
# operator overrides them per fleet with ``gpu_weights``. Longer names must be matched
# first ("A100" before "A10"), which ``gpu_class`` does by sorting on length.
DEFAULT_GPU_WEIGHTS: dict[str, float] = {
    "B200": 2.0,
    "H200": 1.2,
    "H100": 1.0,
    "A100": 0.6,
    "L40S": 0.5,
    "L40": 0.4,
    "A40": 0.35,
    "A10": 0.25,
    "L4": 0.2,
    "V100": 0.2,
    "T4": 0.1,
}
UNKNOWN_CLASS = "unknown"
UNKNOWN_WEIGHT = 0.1


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mb: int
    gpu_class: str


def gpu_class(name: str, classes: Iterable[str] = DEFAULT_GPU_WEIGHTS) -> str:
    """Map a marketing name ("NVIDIA H100 80GB HBM3") to a weight-table class ("H100")."""
    upper = name.upper()
    for cls in sorted((c.upper() for c in classes), key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){cls}(?![0-9])", upper):
            return cls
    return UNKNOWN_CLASS


def weight_of(gpus: list[Gpu], overrides: dict[str, float]) -> float:
    table = {**DEFAULT_GPU_WEIGHTS, **{c.upper(): w for c, w in overrides.items()}}
    return sum(table.get(g.gpu_class, UNKNOWN_WEIGHT) for g in gpus)


_FAKE_ITEM = re.compile(r"^(?:(\d+)x)?([A-Za-z0-9]+)-(\d+)GB$")


def parse_fake(spec: str, classes: Iterable[str] = DEFAULT_GPU_WEIGHTS) -> list[Gpu]:
    """``2xA100-80GB,1xA40-48GB`` -> three GPUs with stable fake UUIDs.

    The class must be one the weight table knows (or an override adds): a typo would
    otherwise join the ring with the weight of an unknown GPU, and nobody would notice.
    """
    known = {c.upper() for c in classes}
    gpus: list[Gpu] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _FAKE_ITEM.match(item)
        if not match:
            raise ConfigError(
                f"fake_gpus: cannot read {item!r}; expected COUNTxCLASS-MEMGB, e.g. 2xA100-80GB"
            )
        count, cls, mem_gb = int(match[1] or 1), match[2].upper(), int(match[3])
        if cls not in known:
            raise ConfigError(
                f"fake_gpus: unknown GPU class {match[2]!r} in {item!r}; known: "
                f"{', '.join(sorted(known))} (add one with gpu_weights)"
            )
        for _ in range(count):
            index = len(gpus)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=f"GPU-fake-{index:04d}-{cls}",
                    name=f"Fake {cls} {mem_gb}GB",
                    memory_mb=mem_gb * 1024,
                    gpu_class=cls,
                )
            )
    if not gpus:
        raise ConfigError("fake_gpus: declares no GPU")
    return gpus


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def probe_nvml(classes: Iterable[str] = DEFAULT_GPU_WEIGHTS) -> list[Gpu]:
    """Read the GPUs through NVML; an empty list where there is no driver or library."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("NVML unavailable (%s); this agent has no GPUs", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=name,
                    memory_mb=int(memory.total) // (1024 * 1024),
                    gpu_class=gpu_class(name, classes),
                )
            )
        return gpus
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs (%s); this agent has no GPUs", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            log.debug("nvmlShutdown failed", exc_info=True)


def inventory(fake_spec: str | None, weight_overrides: dict[str, float]) -> list[Gpu]:
    classes = [*DEFAULT_GPU_WEIGHTS, *weight_overrides]
    if fake_spec:
        return parse_fake(fake_spec, classes)
    return probe_nvml(classes)
