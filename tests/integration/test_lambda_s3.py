"""The Lambda handler fetching its pack from S3 (moto's server, real boto3 calls)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bentos import lambda_handler
from modelpack import read_samples, write_archive
from tests.support.services import MotoS3


@pytest.fixture
def lambda_env(
    s3_server: MotoS3, tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("EDGEBENTO_TRUST", str(keys[1]))
    monkeypatch.setenv("EDGEBENTO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEBENTO_PACK", raising=False)
    lambda_handler.reset()
    yield tmp_path / "cache"
    lambda_handler.reset()


def _ask(pack: Path) -> None:
    samples = read_samples(pack / "samples.npz")
    answer = lambda_handler.handler({"inputs": {"x": samples.inputs["x"].tolist()}}, None)
    np.testing.assert_allclose(answer["outputs"]["probs"], samples.outputs["probs"], rtol=1e-5)


def test_a_pack_archive_on_s3_is_fetched_once_and_served(
    lambda_env: Path,
    s3_server: MotoS3,
    s3_bucket: str,
    signed_pack: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive = write_archive(signed_pack, tmp_path / "tiny-1.tar.gz")
    s3 = s3_server.client()
    s3.upload_file(str(archive), s3_bucket, "packs/tiny-1.tar.gz")  # type: ignore[attr-defined]
    monkeypatch.setenv("EDGEBENTO_PACK_URL", f"s3://{s3_bucket}/packs/tiny-1.tar.gz")
    _ask(signed_pack)
    assert len(list(lambda_env.glob("*/pack/manifest.json"))) == 1
    # A new execution environment on the same /tmp reuses the verified cache: S3 is not asked.
    s3.delete_object(Bucket=s3_bucket, Key="packs/tiny-1.tar.gz")  # type: ignore[attr-defined]
    lambda_handler.reset()
    _ask(signed_pack)


def test_a_pack_directory_on_s3_is_fetched_by_prefix(
    lambda_env: Path,
    s3_server: MotoS3,
    s3_bucket: str,
    signed_pack: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3 = s3_server.client()
    for path in signed_pack.iterdir():
        s3.upload_file(str(path), s3_bucket, f"tiny/1/{path.name}")  # type: ignore[attr-defined]
    monkeypatch.setenv("EDGEBENTO_PACK_URL", f"s3://{s3_bucket}/tiny/1/")
    _ask(signed_pack)


def test_a_tampered_pack_is_a_503_remembered_not_fetched_on_every_invocation(
    lambda_env: Path,
    s3_server: MotoS3,
    s3_bucket: str,
    signed_pack: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3 = s3_server.client()
    for path in signed_pack.iterdir():
        data = path.read_bytes()
        if path.name == "model.onnx":
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        s3.put_object(Bucket=s3_bucket, Key=f"bad/{path.name}", Body=data)  # type: ignore[attr-defined]
    monkeypatch.setenv("EDGEBENTO_PACK_URL", f"s3://{s3_bucket}/bad/")
    request = {"inputs": {"x": [[0.0] * 8]}}
    answer = lambda_handler.handler(request, None)
    assert answer["statusCode"] == 503 and answer["reason"] == "load_failed"
    assert "sha256" in answer["error"]
    # The good bytes are back on S3, but the failure is remembered: no download per call.
    s3.upload_file(str(signed_pack / "model.onnx"), s3_bucket, "bad/model.onnx")  # type: ignore[attr-defined]
    assert lambda_handler.handler(request, None)["reason"] == "load_failed"
    # Past the retry interval, the next call loads again, and serves.
    monkeypatch.setattr(lambda_handler, "RETRY_S", 0.0)
    assert "outputs" in lambda_handler.handler(request, None)


def test_a_missing_pack_is_a_503_that_says_so(
    lambda_env: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEBENTO_PACK_URL", f"s3://{s3_bucket}/nothing/here/")
    answer = lambda_handler.handler({"inputs": {}}, None)
    assert answer["statusCode"] == 503 and "nothing is stored" in answer["error"]
    lambda_handler.reset()
    monkeypatch.setenv("EDGEBENTO_PACK_URL", f"s3://{s3_bucket}/missing.tar.gz")
    assert lambda_handler.handler({"inputs": {}}, None)["reason"] == "load_failed"
