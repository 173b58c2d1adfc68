"""``Updater.stage_beside``, the shadow's install (``edge_agent.shadow``): the same checks as an
install (signature, the version asked, above the highest installed, golden samples), a pack
loaded in the caller's folder, and nothing recorded or served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.registry import Registry
from cloud_sync.store import open_store
from edge_agent.config import AgentConfig
from edge_agent.health import HealthCheckError
from edge_agent.inference import InferenceService
from edge_agent.updater import Updater
from modelpack import generate_keypair
from modelpack.errors import SignatureError, VersionError
from tests.support.agent import make_pack


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[Path, Path], mlp_model: Path) -> dict[str, Any]:
    store = tmp_path / "store"
    registry = Registry(open_store(store))
    for version in (1, 2, 3):
        pack = make_pack(
            tmp_path / f"v{version}", mlp_model, keys[0], version, wrong_golden=version == 3
        )
        registry.publish(pack, trusted=[keys[1]], channel=None)
    other, other_pub = generate_keypair(tmp_path / "other-keys")
    registry.publish(
        make_pack(tmp_path / "v4", mlp_model, other, 4), trusted=[other_pub], channel=None
    )
    config = AgentConfig(
        device="d1",
        data_dir=tmp_path / "data",
        trust=[keys[1]],
        store=str(store),
        file_roots=[tmp_path],
    )
    inference, events = InferenceService(), []
    updater = Updater(config, inference, events.append)
    updater.boot(tmp_path / "v1")
    return {"updater": updater, "inference": inference, "events": events, "tmp": tmp_path}


def test_a_good_version_is_staged_and_loaded_but_neither_recorded_nor_served(
    fleet: dict[str, Any],
) -> None:
    updater: Updater = fleet["updater"]
    before = json.loads(updater.state_file.read_text())
    staging = fleet["tmp"] / "shadow-a"
    pack, predictor = updater.stage_beside("tiny", 2, staging)
    assert (pack.manifest.name, pack.manifest.version) == ("tiny", 2)
    assert pack.root.is_relative_to(staging) and predictor.model_ref["version"] == 2
    assert fleet["inference"].model_ref == {"name": "tiny", "version": 1}  # still serving v1
    assert json.loads(updater.state_file.read_text()) == before  # no mark raised
    assert len(fleet["events"]) == 1  # the boot's install only: a shadow is no install


def test_what_an_install_refuses_the_shadow_refuses(fleet: dict[str, Any]) -> None:
    updater: Updater = fleet["updater"]
    tmp: Path = fleet["tmp"]
    with pytest.raises(VersionError, match="not above v1"):
        updater.stage_beside("tiny", 1, tmp / "shadow-b")  # at the mark
    with pytest.raises(HealthCheckError):
        updater.stage_beside("tiny", 3, tmp / "shadow-c")  # its golden samples fail
    with pytest.raises(SignatureError):
        updater.stage_beside("tiny", 4, tmp / "shadow-d")  # signed by a key it does not trust
    assert fleet["inference"].model_ref == {"name": "tiny", "version": 1}
