"""A bucket writer's keys, indexes and channel pointers against the registry on moto's S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync.registry import Registry
from cloud_sync.registry_index import check_channel, check_name, index_key
from cloud_sync.store import open_store
from modelpack.errors import IntegrityError, SizeLimitError, StoreError
from tests.integration.test_registry import make_pack
from tests.support.services import MotoS3


def _cli(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    return subprocess.run(
        [sys.executable, "-m", "edgebento", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def published(
    s3_bucket: str,
    s3_server: MotoS3,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Registry:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    registry = Registry(open_store(f"s3://{s3_bucket}/registry"))
    registry.publish(make_pack(tmp_path, mlp_model, 1), key=keys[0])
    return registry


def test_odd_keys_are_skipped_and_listing_survives(
    published: Registry, s3_server: MotoS3, s3_bucket: str
) -> None:
    s3 = s3_server.client()
    index = published.store.get_bytes("packs/tiny/1/index.json")
    odd = [
        "packs/tiny/\u00b2/index.json",  # str.isdigit() says yes, int() says no
        "packs/tiny/-1/index.json",
        "packs/tiny/0/index.json",
        "packs/tiny/007/index.json",
        "packs/tiny/1/../2/index.json",
        "packs/t\u00efny/1/index.json",
        f"packs/{'t' * 300}/1/index.json",
        f"packs/tiny/{'9' * 30}/index.json",
    ]
    for key in odd:  # raw S3 writes: the store's own key check would refuse some of them
        s3.put_object(Bucket=s3_bucket, Key=f"registry/{key}", Body=index)  # type: ignore[attr-defined]
    entries, strays = published.scan()
    assert [(e.name, e.version) for e in entries] == [("tiny", 1)]
    assert {s.key for s in strays} == set(odd)
    assert published.versions("tiny") == [1]

    done = _cli(
        "registry",
        "list",
        "--store",
        published.store.url,
        "--json",
        endpoint=s3_server.endpoint_url,
    )
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(p["name"], p["version"], p["channels"]) for p in listed["packs"]] == [
        ("tiny", 1, ["stable"])
    ]
    assert len(listed["skipped"]) == len(odd)
    assert "Traceback" not in done.stderr


def test_names_with_a_trailing_newline_are_not_names() -> None:
    from modelpack.errors import ConfigError

    for bad in ("tiny\n", "stable\n"):
        with pytest.raises(ConfigError):
            check_name(bad)
        with pytest.raises(ConfigError):
            check_channel(bad)
    assert index_key("packs/tiny\n/1/index.json") is None


@pytest.mark.parametrize(
    "change",
    [
        {"archive_size": 0},  # once turned the S3 download cap off
        {"archive_size": -1},
        {"archive_size": "99"},
        {"version": "1"},
        {"version": True},
        {"archive_sha256": "../../../other/1/x"},
        {"manifest_sha256": 5},
        {"schema_version": 7},
    ],
)
def test_a_hostile_index_is_refused_before_any_download(
    published: Registry, tmp_path: Path, change: dict[str, object]
) -> None:
    entry = published.entry("tiny", 1)
    # The archive is swapped for a big one first: if the index's cap were off, all of it
    # would come down before the sha256 check.
    published.store.put_bytes(entry.objects + "pack.tar.gz", b"\0" * (4 << 20))
    doc = {**json.loads(entry.model_dump_json()), **change}
    published.store.put_bytes("packs/tiny/1/index.json", json.dumps(doc).encode())
    with pytest.raises((StoreError, IntegrityError, SizeLimitError)) as caught:
        published.fetch("tiny", 1, tmp_path / "got")
    assert "not a valid registry entry" in str(caught.value) or "describes" in str(caught.value)
    assert not (tmp_path / "got").exists()
    assert [s.key for s in published.scan()[1]] == ["packs/tiny/1/index.json"]


def test_an_inflated_archive_size_still_fails_on_the_sha(
    published: Registry, tmp_path: Path
) -> None:
    entry = published.entry("tiny", 1)
    published.store.put_bytes(entry.objects + "pack.tar.gz", b"\0" * 4096)
    doc = {**json.loads(entry.model_dump_json()), "archive_size": 10**15}
    published.store.put_bytes("packs/tiny/1/index.json", json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        published.fetch("tiny", 1, tmp_path / "got")


def test_broken_channel_pointers_neither_hide_the_registry_nor_block_publishing(
    published: Registry,
    s3_server: MotoS3,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
) -> None:
    store = published.store
    pointer = {"name": "tiny", "channel": "stable", "version": 99, "updated_at": 0.0}
    store.put_bytes("channels/tiny/stable.json", json.dumps(pointer).encode())
    store.put_bytes("channels/tiny/beta.json", b"{not json")
    store.put_bytes("channels/tiny/edge.json", json.dumps({**pointer, "name": "other"}).encode())
    with pytest.raises(IntegrityError, match="points at v99, which is not published"):
        published.latest("tiny")
    assert published.channels("tiny") == {}
    done = _cli("registry", "list", "--store", store.url, "--json", endpoint=s3_server.endpoint_url)
    assert done.returncode == 0, done.stderr
    assert [p["version"] for p in json.loads(done.stdout)["packs"]] == [1]

    # A pointer at a version that is not there does not count as "ahead": v2 repairs it.
    published.publish(make_pack(tmp_path, mlp_model, 2), key=keys[0])
    assert published.latest("tiny") == 2
    published.publish(make_pack(tmp_path, mlp_model, 3), key=keys[0], channel="beta")
    assert published.latest("tiny", "beta") == 3


@pytest.mark.parametrize("where", ["s3", "local"])
def test_two_publisher_processes_of_one_version_leave_exactly_one(
    where: str,
    s3_bucket: str,
    s3_server: MotoS3,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    from tests.support import models

    url = f"s3://{s3_bucket}/reg" if where == "s3" else str(tmp_path / "store")
    packs = [make_pack(tmp_path, models.mlp(tmp_path / f"m{i}.onnx", seed=i), 5) for i in range(2)]
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    command = [sys.executable, "-m", "edgebento", "publish"]
    procs = [
        subprocess.Popen(
            [*command, str(p), "--store", url, "--key", str(keys[0])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in packs
    ]
    results = [(p.wait(timeout=90), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert loser.startswith("error:") and "Traceback" not in loser
    registry = Registry(open_store(url, endpoint_url=s3_server.endpoint_url))
    assert [(e.name, e.version) for e in registry.entries()] == [("tiny", 5)]
    assert registry.latest("tiny") == 5


# The publisher dies by SIGKILL right after its archive and manifest went up, before the
# signature and the index: what a crash or a kill -9 between uploads leaves in the bucket.
KILL_BEFORE_THE_INDEX = """
import os, signal, sys
from cloud_sync.s3store import S3Store
from cloud_sync.store import LocalStore
for cls in (S3Store, LocalStore):
    put = cls.put_bytes
    def dying(self, key, data, put=put):
        if key.endswith("manifest.sig"):
            os.kill(os.getpid(), signal.SIGKILL)
        put(self, key, data)
    cls.put_bytes = dying
from edgebento.cli import main
sys.exit(main())
"""


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_publish_killed_between_uploads_is_invisible_and_a_retry_publishes(
    where: str,
    s3_bucket: str,
    s3_server: MotoS3,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
) -> None:
    from modelpack import load_pack

    url = f"s3://{s3_bucket}/reg" if where == "s3" else str(tmp_path / "store")
    pack = make_pack(tmp_path, mlp_model, 3)
    args = ["publish", str(pack), "--store", url, "--key", str(keys[0])]
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint_url}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_THE_INDEX, *args], env=env, timeout=60
    )
    assert killed.returncode == -9
    registry = Registry(open_store(url, endpoint_url=s3_server.endpoint_url))
    assert registry.store.list("packs/tiny/3/"), "the archive went up before the kill"
    assert registry.scan() == ([], []) and registry.latest("tiny") is None

    done = _cli(*args, endpoint=s3_server.endpoint_url)
    assert done.returncode == 0, done.stderr
    assert [(e.name, e.version) for e in registry.entries()] == [("tiny", 3)]
    assert registry.latest("tiny") == 3
    fetched = registry.fetch("tiny", 3, tmp_path / "got")
    assert load_pack(fetched, trusted=[keys[1]]).manifest.version == 3
