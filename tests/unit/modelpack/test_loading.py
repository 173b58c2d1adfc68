"""Every refusal of load_pack, each triggered for real on a signed pack."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelpack import (
    ExpiredError,
    IntegrityError,
    LayoutError,
    ManifestError,
    ModelInvalidError,
    SignatureError,
    create_pack,
    generate_keypair,
    load_pack,
    sign_pack,
)
from modelpack.signing import load_private_key, sign


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_valid_pack_loads(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    pack = load_pack(signed_pack, trusted=[keys[1]])
    assert pack.manifest.name == "tiny"
    assert pack.manifest.version == 1
    assert pack.manifest.inputs[0].shape == ["batch", 8]
    assert pack.signed_by is not None
    assert pack.samples is not None and pack.samples.inputs["x"].shape == (4, 8)


def test_flipped_byte_in_model_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    model = signed_pack / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as exc:
        load_pack(signed_pack, trusted=[keys[1]])
    assert "model.onnx does not match its sha256" in one_line(exc)


def test_truncated_samples_are_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    samples = signed_pack / "samples.npz"
    samples.write_bytes(samples.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match=r"samples.npz is \d+ bytes; the manifest says"):
        load_pack(signed_pack, trusted=[keys[1]])


def test_edited_manifest_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    path = signed_pack / "manifest.json"
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(SignatureError) as exc:
        load_pack(signed_pack, trusted=[keys[1]])
    assert "changed after signing" in one_line(exc)


def test_whitespace_edit_of_manifest_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    path = signed_pack / "manifest.json"
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(SignatureError):
        load_pack(signed_pack, trusted=[keys[1]])


def test_added_file_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    (signed_pack / "extra.bin").write_bytes(b"payload")
    with pytest.raises(LayoutError) as exc:
        load_pack(signed_pack, trusted=[keys[1]])
    assert one_line(exc) == "extra.bin is in the pack but not listed in the manifest"


def test_removed_file_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    (signed_pack / "samples.npz").unlink()
    with pytest.raises(IntegrityError, match=r"samples\.npz is listed in the manifest but missing"):
        load_pack(signed_pack, trusted=[keys[1]])


def test_other_key_is_refused(signed_pack: Path, tmp_path: Path) -> None:
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not verify against any trusted key"):
        load_pack(signed_pack, trusted=[other_pub])


def test_signed_by_another_key_is_refused(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    other_key, _ = generate_keypair(tmp_path / "other")
    sign_pack(signed_pack, other_key)
    with pytest.raises(SignatureError):
        load_pack(signed_pack, trusted=[keys[1]])


def test_any_of_several_trusted_keys_verifies(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    _, other_pub = generate_keypair(tmp_path / "other")
    assert load_pack(signed_pack, trusted=[other_pub, keys[1]]).signed_by


def test_dropped_signature_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    (signed_pack / "manifest.sig").unlink()
    with pytest.raises(SignatureError) as exc:
        load_pack(signed_pack, trusted=[keys[1]])
    assert "the pack is not signed" in one_line(exc)


def test_garbage_signature_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    (signed_pack / "manifest.sig").write_bytes(b"\0" * 10)
    with pytest.raises(SignatureError, match="an ed25519 signature is 64"):
        load_pack(signed_pack, trusted=[keys[1]])


def test_no_trusted_key_is_refused(signed_pack: Path) -> None:
    with pytest.raises(SignatureError, match="no trusted public key"):
        load_pack(signed_pack, trusted=[])


def test_unsigned_only_when_asked_by_name(signed_pack: Path) -> None:
    (signed_pack / "manifest.sig").unlink()
    with pytest.raises(SignatureError, match="the pack is not signed"):
        load_pack(signed_pack, trusted=[])
    pack = load_pack(signed_pack, trusted=[], allow_unsigned=True)
    assert pack.signed_by is None


def test_symlinked_file_is_refused(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (signed_pack / "link.txt").symlink_to(outside)
    with pytest.raises(LayoutError, match=r"link\.txt is a symlink"):
        load_pack(signed_pack, trusted=[keys[1]])


def test_listed_file_replaced_by_symlink_is_refused(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    real = signed_pack / "samples.npz"
    moved = tmp_path / "samples.npz"
    real.rename(moved)
    real.symlink_to(moved)  # same bytes, but through a link
    with pytest.raises(LayoutError, match=r"samples\.npz is a symlink"):
        load_pack(signed_pack, trusted=[keys[1]])


def test_symlinked_pack_dir_is_refused(
    signed_pack: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    link = tmp_path / "link-to-pack"
    link.symlink_to(signed_pack)
    with pytest.raises(LayoutError, match="is not a pack directory"):
        load_pack(link, trusted=[keys[1]])


def _resign(pack: Path, key: Path, doc: dict) -> None:
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    (pack / "manifest.json").write_bytes(data)
    (pack / "manifest.sig").write_bytes(sign(data, load_private_key(key)))


def test_manifest_path_escaping_the_pack_is_refused(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    doc = json.loads((signed_pack / "manifest.json").read_text())
    doc["files"].append({"path": "../outside.txt", "sha256": "0" * 64, "size": 1})
    _resign(signed_pack, keys[0], doc)
    with pytest.raises(ManifestError, match=r"unsafe file path '\.\./outside.txt'"):
        load_pack(signed_pack, trusted=[keys[1]])


def test_expired_pack_is_refused(tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]) -> None:
    out = tmp_path / "pack"
    past = datetime.now(UTC) - timedelta(days=1)
    create_pack(mlp_model, out, name="tiny", version=1, expires_at=past, key=keys[0])
    with pytest.raises(ExpiredError, match="tiny v1 expired at"):
        load_pack(out, trusted=[keys[1]])
    assert load_pack(out, trusted=[keys[1]], allow_expired=True).manifest.expired


def test_unknown_schema_version_is_refused(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    doc = json.loads((signed_pack / "manifest.json").read_text())
    doc["schema_version"] = 2
    _resign(signed_pack, keys[0], doc)
    with pytest.raises(ManifestError, match="schema_version 2 is not supported"):
        load_pack(signed_pack, trusted=[keys[1]])


def test_signed_invalid_model_fails_onnx_checker(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A model ONNX Runtime can load structurally but onnx.checker refuses (no opset import)."""
    import onnx
    from onnx import TensorProto, helper

    from tests.support import models

    source = models.mlp(tmp_path / "m.onnx")
    out = tmp_path / "pack"
    create_pack(source, out, name="tiny", version=1)
    model = onnx.load(str(out / "model.onnx"))
    model.graph.node.append(helper.make_node("NoSuchOp", ["x"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    onnx.save(model, str(out / "model.onnx"))
    doc = json.loads((out / "manifest.json").read_text())
    from modelpack.pack import list_files

    doc["files"] = [f.model_dump() for f in list_files(out)]
    _resign(out, keys[0], doc)
    with pytest.raises(ModelInvalidError, match=r"fails onnx\.checker"):
        load_pack(out, trusted=[keys[1]])


def test_external_data_outside_the_pack_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    import onnx

    from modelpack.pack import list_files
    from tests.support import models

    out = tmp_path / "pack"
    create_pack(models.mlp(tmp_path / "m.onnx"), out, name="tiny", version=1)
    model = onnx.load(str(out / "model.onnx"))
    onnx.save_model(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    doc = json.loads((out / "manifest.json").read_text())
    doc["files"] = [f.model_dump() for f in list_files(out)]
    _resign(out, keys[0], doc)
    assert load_pack(out, trusted=[keys[1]]).manifest.file("weights.bin") is not None

    # Point the weights at a file outside the pack, then re-sign: the pack is still refused.
    secret = tmp_path / "secret.bin"
    secret.write_bytes((out / "weights.bin").read_bytes())
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (out / "model.onnx").write_bytes(model.SerializeToString())
    doc["files"] = [f.model_dump() for f in list_files(out)]
    _resign(out, keys[0], doc)
    with pytest.raises(LayoutError, match=r"keeps its data at '\.\./secret.bin', outside the pack"):
        load_pack(out, trusted=[keys[1]])


def test_sign_refuses_a_pack_whose_files_drifted(
    signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    (signed_pack / "model.onnx").write_bytes(b"not the model that was listed")
    with pytest.raises(IntegrityError):
        sign_pack(signed_pack, keys[0])


def test_signing_key_is_private(tmp_path: Path) -> None:
    key, pub = generate_keypair(tmp_path / "k")
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_size_caps(signed_pack: Path, keys: tuple[Path, Path]) -> None:
    from modelpack import Limits, SizeLimitError

    with pytest.raises(SizeLimitError, match="the cap is 100"):
        load_pack(signed_pack, trusted=[keys[1]], limits=Limits(max_pack_bytes=100))
    with pytest.raises(SizeLimitError, match="more than 1 files"):
        load_pack(signed_pack, trusted=[keys[1]], limits=Limits(max_files=1))
    with pytest.raises(SizeLimitError, match=r"manifest\.json is \d+ bytes; the cap is 10"):
        load_pack(signed_pack, trusted=[keys[1]], limits=Limits(max_manifest_bytes=10))
