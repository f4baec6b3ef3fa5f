"""Configuration: every source, and a per-field message for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import ROOT

from mesh.config import AgentConfig, load_agent_config
from mesh.errors import ConfigError


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What a secure agent needs besides its flags: a gossip key, and TLS files."""
    keys = tmp_path / "gossip.keys"
    keys.write_text("a-gossip-key-of-sufficient-length\n")
    monkeypatch.setenv("MESH_GOSSIP_KEY_FILE", str(keys))
    for name in ("ca", "cert", "key"):
        monkeypatch.setenv(f"MESH_TLS_{name.upper()}", str(tmp_path / f"{name}.pem"))
    return keys


def test_defaults_are_valid_with_the_secrets(secrets: Path) -> None:
    cfg = load_agent_config([])
    assert cfg.queues == {"vip": 8, "normal": 2}
    assert cfg.default_queue in cfg.queues
    assert cfg.max_message_bytes > cfg.max_payload_bytes
    assert not cfg.insecure


def test_no_secure_default_is_silent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TLS material and a gossip key the agent refuses to start, saying which."""
    with pytest.raises(ConfigError, match="gossip needs a key"):
        load_agent_config([])
    keys = tmp_path / "gossip.keys"
    keys.write_text("a-gossip-key-of-sufficient-length\n")
    with pytest.raises(ConfigError, match="tls_ca, tls_cert, tls_key unset"):
        load_agent_config(["--gossip-key-file", str(keys)])


def test_gossip_keys_never_come_from_the_command_line(secrets: Path) -> None:
    with pytest.raises(ConfigError, match="never go on the command line"):
        load_agent_config(["--gossip-keys", '["a-gossip-key-of-sufficient-length"]'])


def test_a_placeholder_gossip_key_is_refused(
    secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_GOSSIP_KEYS", '["change-me-to-a-long-random-secret"]')
    with pytest.raises(ConfigError, match="a placeholder is no key"):
        load_agent_config([])


def test_flags_override_environment_which_overrides_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secrets: Path
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("lease_ttl_s: 7\ndc: from-file\nmodel_load_s: 1.5\n")
    monkeypatch.setenv("MESH_LEASE_TTL_S", "9")
    cfg = load_agent_config(["--config", str(config), "--dc", "from-flag"])
    assert cfg.dc == "from-flag"
    assert cfg.lease_ttl_s == 9
    assert cfg.model_load_s == 1.5


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--lease-ttl-s", "1"], "lease_ttl_s"),
        (["--dc", "Bad DC"], "dc"),
        (["--queues", '{"vip": 0}', "--default-queue", "vip"], "weights must be positive"),
        (["--default-queue", "gold"], "default_queue 'gold' is not one of the queues"),
        (["--models", '["ok", ""]'], "models.1"),
        (["--inline-payload-bytes", "2048", "--max-payload-bytes", "1024"], "inline_payload"),
        (["--commands", '{"x": []}'], "commands.x: argv is empty"),
    ],
)
def test_bad_values_are_named(argv: list[str], field: str, secrets: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(argv)
    assert field in caught.value.message
    assert caught.value.message.startswith("invalid configuration:")


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_agent_config(["--config", str(tmp_path / "nope.yaml")])


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("lease_ttl: 7\n")
    with pytest.raises(ConfigError, match="lease_ttl"):
        load_agent_config(["--config", str(config)])


def test_every_field_documents_itself() -> None:
    undocumented = [
        name
        for name, info in AgentConfig.model_fields.items()
        if not info.description and name != "log_level"
    ]
    assert undocumented == []


def test_the_deploy_example_config_is_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As written, with its gossip key file where the example says it is (here: a
    variable pointing at a temporary one)."""
    example = ROOT / "deploy" / "agent.yaml"
    keys = tmp_path / "gossip.keys"
    keys.write_text("a-gossip-key-of-sufficient-length\n")
    monkeypatch.setenv("MESH_GOSSIP_KEY_FILE", str(keys))
    cfg = load_agent_config(["--config", str(example)])
    assert cfg.dc == "eu-west" and cfg.gossip_keys and cfg.tls_cert and not cfg.insecure
