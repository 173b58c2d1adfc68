"""The registry on moto's S3 server through real boto3 calls, driven through the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.registry import Registry
from cloud_sync.store import open_store
from edgebento.cli import main
from modelpack import Samples, create_pack, load_pack
from tests.support import models
from tests.support.registry import publish_concurrently
from tests.support.services import MotoS3


@pytest.fixture
def store_url(s3_bucket: str, s3_server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    return f"s3://{s3_bucket}/registry"


def make_pack(tmp: Path, model: Path, version: int, extras: tuple[Path, ...] = ()) -> Path:
    inputs, outputs = models.golden_samples(model)
    out = tmp / f"pack-v{version}-{len(list(tmp.iterdir()))}"
    create_pack(
        model, out, name="tiny", version=version, samples=Samples(inputs, outputs), extras=extras
    )
    return out


def test_publish_list_show_fetch(
    store_url: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pack = make_pack(tmp_path, mlp_model, 1)
    assert main(["publish", str(pack), "--store", store_url, "--key", str(keys[0])]) == 0
    assert "published tiny v1" in capsys.readouterr().out
    assert not (pack / "manifest.sig").exists()  # the user's directory is left as it was

    assert main(["registry", "list", "--store", store_url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["packs"]
    assert [(p["name"], p["version"], p["channels"]) for p in listed] == [("tiny", 1, ["stable"])]
    assert main(["registry", "list", "--store", store_url]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "stable" in table

    assert main(["registry", "show", "tiny", "1", "--store", store_url, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["name"] == "tiny" and shown["channels"] == ["stable"]

    registry = Registry(open_store(store_url))
    fetched = registry.fetch("tiny", 1, tmp_path / "fetched")
    verified = load_pack(fetched, trusted=[keys[1]])
    assert verified.manifest.version == 1 and verified.signed_by == shown["entry"]["signed_by"]
    assert registry.latest("tiny") == 1


def test_refuses_other_bytes_for_a_published_version(
    store_url: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = make_pack(tmp_path, mlp_model, 1)
    assert main(["publish", str(first), "--store", store_url, "--key", str(keys[0])]) == 0
    assert main(["publish", str(first), "--store", store_url, "--key", str(keys[0])]) == 0
    other_model = models.mlp(tmp_path / "other.onnx", seed=7)
    other = make_pack(tmp_path, other_model, 1)
    capsys.readouterr()
    assert main(["publish", str(other), "--store", store_url, "--key", str(keys[0])]) == 1
    assert "already published with other contents" in capsys.readouterr().err
    fetched = Registry(open_store(store_url)).fetch("tiny", 1, tmp_path / "f")
    assert (fetched / "model.onnx").read_bytes() == mlp_model.read_bytes()


def test_refuses_a_pack_over_its_accuracy_budget_unless_forced(
    store_url: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"within_budget": False, "fidelity": {"top1_agreement": 0.91}}))
    inputs, outputs = models.golden_samples(mlp_model)
    pack = tmp_path / "pack"
    create_pack(
        mlp_model, pack, name="tiny", version=3, samples=Samples(inputs, outputs), report=report
    )
    args = ["publish", str(pack), "--store", store_url, "--key", str(keys[0])]
    assert main(args) == 1
    assert "failed its accuracy budget" in capsys.readouterr().err
    assert Registry(open_store(store_url)).latest("tiny") is None
    assert main([*args, "--force"]) == 0
    assert main(["registry", "list", "--store", store_url]) == 0
    assert "over budget" in capsys.readouterr().out


def test_unsigned_pack_without_a_key_is_refused(
    store_url: str, tmp_path: Path, mlp_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pack = make_pack(tmp_path, mlp_model, 1)
    assert main(["publish", str(pack), "--store", store_url]) == 1
    assert "not signed" in capsys.readouterr().err


def test_reader_racing_a_publish_never_sees_a_half_written_version(
    store_url: str,
    s3_server: MotoS3,
    s3_bucket: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
) -> None:
    from boto3.s3.transfer import TransferConfig

    # A 12 MB extra file, uploaded in 5 MB parts: the archive goes up in several requests.
    blob = tmp_path / "weights.bin"
    blob.write_bytes(np.random.default_rng(0).bytes(12 << 20))
    packs = [make_pack(tmp_path, mlp_model, v, extras=(blob,)) for v in (1, 2, 3)]
    writer = Registry(open_store(store_url))
    writer.store.transfer = TransferConfig(  # type: ignore[attr-defined]
        multipart_threshold=5 << 20, multipart_chunksize=5 << 20
    )
    reader = Registry(open_store(store_url))
    seen: list[int] = []
    errors: list[str] = []
    done = threading.Event()

    def read() -> None:
        n, finished = 0, False
        while not finished:
            # One round more once the writer is done: a reader thread a busy machine ran only
            # after the last publish would otherwise read nothing, and ``seen`` be empty.
            finished = done.is_set()
            n += 1
            for version in reader.versions("tiny"):
                target = tmp_path / "reads" / f"{version}-{n}"
                try:
                    pack = load_pack(reader.fetch("tiny", version, target), trusted=[keys[1]])
                except Exception as exc:  # any failure is what this test exists to catch
                    errors.append(f"v{version}: {exc!r}")
                    continue
                seen.append(pack.manifest.version)
            latest = reader.latest("tiny")
            if latest is not None and latest not in reader.versions("tiny"):
                errors.append(f"channel points at v{latest}, which is not listed")

    thread = threading.Thread(target=read)
    thread.start()
    for pack in packs:
        writer.publish(pack, key=keys[0])
    done.set()
    thread.join()
    assert not errors, errors[:3]
    assert writer.latest("tiny") == 3 and seen and set(seen) <= {1, 2, 3}
    head = s3_server.client().head_object(  # type: ignore[attr-defined]
        Bucket=s3_bucket, Key=f"registry/{writer.entry('tiny', 3).objects}pack.tar.gz"
    )
    assert head["ETag"].strip('"').endswith("-3"), "the archive went up as a 3-part upload"


def test_moto_honours_create_only_and_compare_and_swap_writes(store_url: str) -> None:
    from modelpack.errors import ConflictError

    store = open_store(store_url)
    etag = store.create("probe.json", b"one")
    with pytest.raises(ConflictError):
        store.create("probe.json", b"two")  # PutObject If-None-Match: * -> 412
    newer = store.replace("probe.json", b"two", etag)
    with pytest.raises(ConflictError):
        store.replace("probe.json", b"three", etag)  # If-Match on a stale ETag -> 412
    assert store.read("probe.json") == (b"two", newer)


def test_concurrent_publishes_of_one_version_on_s3_leave_exactly_one(
    store_url: str, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    packs = [make_pack(tmp_path, models.mlp(tmp_path / f"m{i}.onnx", seed=i), 5) for i in range(3)]
    won, refused = publish_concurrently(lambda: Registry(open_store(store_url)), packs, keys[0])
    assert len(won) == 1 and len(refused) == 2
    assert "concurrently" in str(refused[0]) or "already published" in str(refused[0])
    winners = [won[0].manifest_sha256]
    registry = Registry(open_store(store_url))
    assert registry.entry("tiny", 5).manifest_sha256 == winners[0]
    fetched = load_pack(registry.fetch("tiny", 5, tmp_path / "f"), trusted=[keys[1]])
    assert fetched.manifest_sha256 == winners[0]


def test_swapped_objects_stray_keys_and_oversized_archives_on_s3(
    store_url: str,
    s3_server: MotoS3,
    s3_bucket: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from modelpack.errors import IntegrityError, SizeLimitError

    registry = Registry(open_store(store_url))
    entry = registry.publish(make_pack(tmp_path, mlp_model, 1), key=keys[0])
    s3 = s3_server.client()
    # Copy every object of tiny v1 under tiny v9, as anyone with write access could.
    for key in registry.store.list("packs/tiny/1/"):
        s3.copy_object(  # type: ignore[attr-defined]
            Bucket=s3_bucket,
            Key=f"registry/{key.replace('/1/', '/9/', 1)}",
            CopySource={"Bucket": s3_bucket, "Key": f"registry/{key}"},
        )
    registry.store.put_bytes("packs/tiny/007/index.json", b"{}")
    with pytest.raises(IntegrityError, match="describes tiny v1, not tiny v9"):
        registry.fetch("tiny", 9, tmp_path / "nine")
    capsys.readouterr()
    assert main(["registry", "list", "--store", store_url, "--json"]) == 0
    out = capsys.readouterr()
    listed = json.loads(out.out)
    assert [(p["name"], p["version"]) for p in listed["packs"]] == [("tiny", 1)]
    assert {s["key"] for s in listed["skipped"]} == {
        "packs/tiny/9/index.json",
        "packs/tiny/007/index.json",
    }
    assert "skipped packs/tiny/007/index.json" in out.err

    # An archive swapped for a bigger one: the ranged GET reads no more than the index says.
    registry.store.put_bytes(entry.objects + "pack.tar.gz", b"\0" * (entry.archive_size + 4096))
    with pytest.raises(SizeLimitError, match=f"over its expected {entry.archive_size} bytes"):
        registry.fetch("tiny", 1, tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_publish_of_an_older_version_leaves_the_channel_unless_told(
    store_url: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--store", store_url, "--key", str(keys[0])]
    assert main(["publish", str(make_pack(tmp_path, mlp_model, 4)), *base]) == 0
    older = make_pack(tmp_path, mlp_model, 2)
    capsys.readouterr()
    assert main(["publish", str(older), *base]) == 1
    assert "stable of tiny is at v4" in capsys.readouterr().err
    assert main(["publish", str(older), *base, "--allow-backwards"]) == 0
    assert Registry(open_store(store_url)).latest("tiny") == 2
