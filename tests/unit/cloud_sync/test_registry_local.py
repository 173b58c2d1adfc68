"""The registry on a local directory store: same layout and rules as on S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.registry import Registry
from cloud_sync.store import LocalStore
from modelpack import Samples, create_pack, load_pack
from modelpack.errors import IntegrityError, NotFoundError, PackError, SignatureError, VersionError
from tests.support import models


def pack(
    tmp: Path, model: Path, version: int, name: str = "tiny", report: dict | None = None
) -> Path:
    inputs, outputs = models.golden_samples(model)
    out = tmp / f"{name}-{version}-{len(list(tmp.iterdir()))}"
    report_path = None
    if report is not None:
        report_path = tmp / "report.json"
        report_path.write_text(json.dumps(report))
    create_pack(
        model,
        out,
        name=name,
        version=version,
        samples=Samples(inputs, outputs),
        report=report_path,
    )
    return out


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(LocalStore(tmp_path / "store"))


def test_publish_signs_uploads_and_points_the_channel_last(
    registry: Registry, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    entry = registry.publish(pack(src, mlp_model, 1), key=keys[0], channel="beta")
    assert entry.signed_by and entry.archive_size > 0
    assert registry.latest("tiny", "beta") == 1 and registry.latest("tiny") is None
    objects = f"packs/tiny/1/{entry.archive_sha256}/"
    assert registry.store.list("packs/tiny/1/") == [
        objects + "manifest.json",
        objects + "manifest.sig",
        objects + "pack.tar.gz",
        "packs/tiny/1/index.json",
    ]
    registry.set_channel("tiny", "stable", 1)
    assert registry.channels("tiny") == {"beta": 1, "stable": 1}
    fetched = registry.fetch("tiny", 1, tmp_path / "out")
    assert load_pack(fetched, trusted=[keys[1]]).manifest.version == 1


def test_refusals(
    registry: Registry, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    first = pack(src, mlp_model, 1)
    registry.publish(first, key=keys[0])
    assert registry.publish(first, key=keys[0]).version == 1  # same bytes: fine
    other = pack(src, models.mlp(tmp_path / "o.onnx", seed=3), 1)
    with pytest.raises(VersionError, match="already published with other contents"):
        registry.publish(other, key=keys[0])
    with pytest.raises(SignatureError, match="not signed"):
        registry.publish(pack(src, mlp_model, 2), key=None)
    failing = pack(src, mlp_model, 3, report={"within_budget": False})
    with pytest.raises(PackError, match="failed its accuracy budget"):
        registry.publish(failing, key=keys[0])
    assert registry.publish(failing, key=keys[0], force=True).within_budget is False
    with pytest.raises(NotFoundError, match="v9 is not published"):
        registry.fetch("tiny", 9, tmp_path / "nine")
    with pytest.raises(NotFoundError):
        registry.set_channel("tiny", "stable", 9)


def test_a_signature_by_an_untrusted_key_is_refused(
    registry: Registry, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    from modelpack import generate_keypair, sign_pack

    other_key, _ = generate_keypair(tmp_path / "other")
    src = tmp_path / "src"
    src.mkdir()
    signed_elsewhere = pack(src, mlp_model, 1)
    sign_pack(signed_elsewhere, other_key)
    with pytest.raises(SignatureError):
        registry.publish(signed_elsewhere, key=keys[0])


def test_a_tampered_archive_is_refused_on_fetch(
    registry: Registry, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    entry = registry.publish(pack(src, mlp_model, 1), key=keys[0])
    archive = tmp_path / "store" / entry.objects / "pack.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        registry.fetch("tiny", 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
