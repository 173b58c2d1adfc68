from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config
from modelpack.errors import ConfigError


def test_flags_override_the_environment_which_overrides_the_file(tmp_path: Path) -> None:
    file = tmp_path / "agent.toml"
    file.write_text(
        '[agent]\ndevice = "from-file"\nbroker = "mqtt://10.0.0.1:1883"\n'
        'data_dir = "/var/lib/a"\ntrust = ["/etc/k.pub"]\n[agent.limits]\ntelemetry_interval = 30\n'
    )
    env = {"EDGEBENTO_BROKER": "mqtts://iot.example:8883", "EDGEBENTO_DEVICE": "from-env"}
    config = load_config(file, {"device": "from-flag", "store": None}, env)
    assert config.device == "from-flag"
    assert config.broker_host == "iot.example" and config.broker_port == 8883 and config.tls
    assert config.limits.telemetry_interval == 30
    assert config.trust == [Path("/etc/k.pub")]


def test_environment_lists_and_defaults(tmp_path: Path) -> None:
    env = {
        "EDGEBENTO_DEVICE": "d1",
        "EDGEBENTO_DATA_DIR": str(tmp_path),
        "EDGEBENTO_TRUST": "/a.pub,/b.pub",
        "EDGEBENTO_TELEMETRY_INTERVAL": "2.5",
    }
    config = load_config(None, {}, env)
    assert config.trust == [Path("/a.pub"), Path("/b.pub")]
    assert config.limits.telemetry_interval == 2.5
    assert config.prefix == "edgebento" and config.protocol == "5" and config.broker_port == 1883


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"broker": "http://x"}, "broker"),
        ({"device": "bad/id"}, "device"),
        ({"trust": []}, "trust"),
        ({"outbox_max_bytes": 10}, "outbox_max_bytes"),
    ],
)
def test_bad_settings_are_one_clear_config_error(
    tmp_path: Path, flags: dict[str, object], words: str
) -> None:
    base = {"device": "d1", "data_dir": tmp_path, "trust": [tmp_path / "k.pub"]}
    with pytest.raises(ConfigError, match=words):
        load_config(None, {**base, **flags}, {})


def test_a_broken_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("device = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, {}, {})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", {}, {})
