"""GPU inventory: the declared fake, and NVML faked at the ``pynvml`` boundary only."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from mesh.errors import ConfigError
from mesh.gpus import Gpu, gpu_class, inventory, parse_fake, probe_nvml, weight_of


def test_parse_fake_inventory() -> None:
    gpus = parse_fake("2xA100-80GB, 1xA40-48GB")
    assert [(g.index, g.gpu_class, g.memory_mb) for g in gpus] == [
        (0, "A100", 81920),
        (1, "A100", 81920),
        (2, "A40", 49152),
    ]
    assert len({g.uuid for g in gpus}) == 3


@pytest.mark.parametrize(
    "spec", ["", "2xA100", "twoxA100-80GB", "2xA100-80", ",", "2xH1OO-80GB", "0.5xA100-80GB"]
)
def test_bad_fake_inventory_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="fake_gpus"):
        parse_fake(spec)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "unknown"),
    ],
)
def test_marketing_names_map_to_classes(name: str, cls: str) -> None:
    assert gpu_class(name) == cls


def test_weights_follow_the_class_table_and_overrides() -> None:
    h100 = parse_fake("1xH100-80GB")
    t4 = parse_fake("1xT4-16GB")
    assert weight_of(h100, {}) > weight_of(parse_fake("1xA100-80GB"), {}) > weight_of(t4, {})
    assert weight_of(t4, {"T4": 3.0}) == 3.0


class FakeNvml:
    """The pynvml calls the inventory makes, answering for the GPUs given."""

    def __init__(self, devices: list[tuple[str | bytes, str, int]]) -> None:
        self.devices = devices
        self.shutdowns = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
        monkeypatch.setattr(pynvml, "nvmlShutdown", self.shutdown)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(self.devices))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: self.devices[h][0])
        monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: self.devices[h][1])
        monkeypatch.setattr(
            pynvml,
            "nvmlDeviceGetMemoryInfo",
            lambda h: SimpleNamespace(total=self.devices[h][2], free=0, used=0),
        )

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_nvml_inventory(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(
        [
            (b"NVIDIA H100 80GB HBM3", "GPU-aaaa", 80 * 1024**3),  # older bindings return bytes
            ("NVIDIA L40S", "GPU-bbbb", 48 * 1024**3),
        ]
    )
    nvml.install(monkeypatch)
    assert inventory(None, {}) == [
        Gpu(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 81920, "H100"),
        Gpu(1, "GPU-bbbb", "NVIDIA L40S", 49152, "L40S"),
    ]
    assert nvml.shutdowns == 1


def test_nvml_missing_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert probe_nvml() == []


def test_nvml_failing_midway_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([("NVIDIA A100", "GPU-a", 1)])
    nvml.install(monkeypatch)

    def lost(handle: int) -> str:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lost)
    assert probe_nvml() == []
    assert nvml.shutdowns == 1


def test_fake_class_may_come_from_overrides() -> None:
    assert inventory("1x4090-24GB", {"4090": 0.7})[0].gpu_class == "4090"


def test_override_classes_are_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([("NVIDIA GeForce RTX 4090", "GPU-c", 24 * 1024**3)]).install(monkeypatch)
    assert inventory(None, {"4090": 0.7})[0].gpu_class == "4090"
