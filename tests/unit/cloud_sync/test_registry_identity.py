"""The registry's identity is the signed manifest, publishing is create-only, and a channel
moves back only when told: each finding of issue 14 triggered for real on a local store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cloud_sync.registry import Registry
from cloud_sync.store import LocalStore
from modelpack.errors import ConflictError, IntegrityError, SizeLimitError, VersionError
from tests.support import models
from tests.support.registry import publish_concurrently
from tests.unit.cloud_sync.test_registry_local import pack


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(LocalStore(tmp_path / "store"))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


def test_objects_copied_under_another_name_and_version_are_refused(
    registry: Registry, src: Path, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    registry.publish(pack(src, mlp_model, 1, name="other"), key=keys[0])
    registry.publish(pack(src, mlp_model, 1, name="det"), key=keys[0])
    root = tmp_path / "store" / "packs"
    shutil.copytree(root / "other" / "1", root / "det" / "9")  # no key needed to do this
    with pytest.raises(IntegrityError, match="describes other v1, not det v9"):
        registry.entry("det", 9)
    with pytest.raises(IntegrityError):
        registry.fetch("det", 9, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    entries, strays = registry.scan()
    assert [(e.name, e.version) for e in entries] == [("det", 1), ("other", 1)]
    assert [s.key for s in strays] == ["packs/det/9/index.json"]

    # An index rewritten to say det v9 still points at a manifest signed as other v1.
    index = root / "det" / "9" / "index.json"
    index.write_text(
        index.read_text().replace('"other"', '"det"').replace('"version": 1', '"version": 9')
    )
    with pytest.raises(IntegrityError, match="signed manifest under det v9 is other v1"):
        registry.entry("det", 9)


def test_a_manifest_swapped_behind_the_index_is_refused(
    registry: Registry, src: Path, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    first = registry.publish(pack(src, mlp_model, 1), key=keys[0])
    second = registry.publish(pack(src, mlp_model, 2), key=keys[0])
    store = tmp_path / "store"
    shutil.copyfile(
        store / second.objects / "manifest.json", store / first.objects / "manifest.json"
    )
    with pytest.raises(IntegrityError, match="not the one its index records"):
        registry.entry("tiny", 1)


def test_a_stray_key_is_reported_and_skipped(
    registry: Registry, src: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    registry.publish(pack(src, mlp_model, 7), key=keys[0])
    registry.store.put_bytes("packs/tiny/007/index.json", b"{}")
    registry.store.put_bytes("packs/tiny/8/index.json", b"not json")
    entries, strays = registry.scan()
    assert [(e.name, e.version) for e in entries] == [("tiny", 7)]
    assert {s.key for s in strays} == {"packs/tiny/007/index.json", "packs/tiny/8/index.json"}
    assert registry.versions("tiny") == [7, 8]  # listed as keys; entry(8) says why it is bad


def test_a_download_past_the_indexed_size_stops_before_the_sha_check(
    registry: Registry, src: Path, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    entry = registry.publish(pack(src, mlp_model, 1), key=keys[0])
    archive = tmp_path / "store" / entry.objects / "pack.tar.gz"
    archive.write_bytes(archive.read_bytes() + b"\0" * (8 << 20))
    with pytest.raises(SizeLimitError, match=f"over its expected {entry.archive_size} bytes"):
        registry.fetch("tiny", 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_concurrent_publishes_of_one_version_leave_exactly_one(
    tmp_path: Path, src: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    packs = [pack(src, models.mlp(tmp_path / f"m{i}.onnx", seed=i), 5) for i in range(4)]
    won, refused = publish_concurrently(
        lambda: Registry(LocalStore(tmp_path / "store")), packs, keys[0]
    )
    assert len(won) == 1 and len(refused) == 3, refused
    registry = Registry(LocalStore(tmp_path / "store"))
    assert registry.entry("tiny", 5).manifest_sha256 == won[0].manifest_sha256
    # The losers removed their objects: only the winner's remain under the version.
    assert (
        len({k.split("/")[3] for k in registry.store.list("packs/tiny/5/") if k.count("/") == 4})
        == 1
    )


def test_a_channel_moves_back_only_when_told(
    registry: Registry, src: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    registry.publish(pack(src, mlp_model, 5), key=keys[0])
    old = pack(src, mlp_model, 3)
    with pytest.raises(VersionError, match="stable of tiny is at v5"):
        registry.publish(old, key=keys[0])
    assert registry.versions("tiny") == [5]  # refused before anything was uploaded
    registry.publish(old, key=keys[0], channel=None)
    with pytest.raises(VersionError, match="--allow-backwards"):
        registry.set_channel("tiny", "stable", 3)
    registry.set_channel("tiny", "stable", 3, allow_backwards=True)
    assert registry.latest("tiny") == 3


def test_local_conditional_writes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    etag = store.create("a/b.json", b"one")
    with pytest.raises(ConflictError):
        store.create("a/b.json", b"two")
    data, read_etag = store.read("a/b.json")
    assert (data, read_etag) == (b"one", etag)
    newer = store.replace("a/b.json", b"two", etag)
    with pytest.raises(ConflictError, match="changed since it was read"):
        store.replace("a/b.json", b"three", etag)  # a stale etag loses
    assert store.read("a/b.json") == (b"two", newer)
    assert store.list() == ["a/b.json"]
