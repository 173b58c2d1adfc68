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
        n = 0
        while not done.is_set():
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
        Bucket=s3_bucket, Key="registry/packs/tiny/3/pack.tar.gz"
    )
    assert head["ETag"].strip('"').endswith("-3"), "the archive went up as a 3-part upload"
