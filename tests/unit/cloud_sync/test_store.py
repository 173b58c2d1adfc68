from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.s3store import S3Store
from cloud_sync.store import LocalStore, open_store
from modelpack.errors import NotFoundError, StoreError


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    store.put_bytes("a/b/c.bin", b"one")
    store.put_bytes("a/d.bin", b"two")
    store.put_bytes("a/b/c.bin", b"three")  # overwrite
    assert store.get_bytes("a/b/c.bin") == b"three"
    assert store.list() == ["a/b/c.bin", "a/d.bin"]
    assert store.list("a/b/") == ["a/b/c.bin"]
    assert store.exists("a/d.bin") and not store.exists("a/x")
    src = tmp_path / "src.bin"
    src.write_bytes(b"file" * 1000)
    store.put_file("f/src.bin", src)
    out = store.get_file("f/src.bin", tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()
    store.delete("a/d.bin")
    store.delete("a/d.bin")  # deleting what is gone is fine
    assert store.list("a/") == ["a/b/c.bin"]
    assert store.presign("a/b/c.bin").startswith("file://")
    # no temporary files are left beside the objects
    assert not [p for p in (tmp_path / "s").rglob(".tmp-*")]


def test_missing_objects_raise_not_found(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(NotFoundError, match="nope is not in"):
        store.get_bytes("nope")
    with pytest.raises(NotFoundError):
        store.get_file("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a\\b", "./a", "a/.tmp-x"])
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(str(tmp_path)).url == tmp_path.resolve().as_uri()
    s3 = open_store(
        "s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:9", region="eu-west-1"
    )
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "some/prefix"
    assert s3.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert s3.client.meta.region_name == "eu-west-1"
    assert s3.client.meta.config.retries["mode"] == "standard"
    assert s3.client.meta.config.retries["total_max_attempts"] == 9  # 1 try + 8 retries
    assert s3.transfer.multipart_threshold == 16 << 20
    with pytest.raises(StoreError, match="names no bucket"):
        open_store("s3:///x")
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="local path"):
        open_store("file://otherhost/x")


def test_s3_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    store = open_store("s3://bucket")
    assert store.client.meta.endpoint_url == "http://127.0.0.1:4566"  # type: ignore[attr-defined]
    assert store.url == "s3://bucket"
