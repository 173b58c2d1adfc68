from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bentos.store import import_pack, load_stored_pack, stored_manifest
from modelpack.errors import ConfigError, IntegrityError, SignatureError, VersionError


@pytest.fixture
def model_store(tmp_path: Path) -> Iterator[Path]:
    """A BentoML model store of the test's own."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    root = tmp_path / "models"
    root.mkdir()
    BentoMLContainer.model_store.set(ModelStore(root))
    yield root
    BentoMLContainer.model_store.reset()


def test_import_stores_the_verified_pack_as_name_and_version(
    model_store: Path, signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    import bentoml

    tag = import_pack(signed_pack, [keys[1]])
    assert tag == "tiny:v1"
    model = bentoml.models.get("tiny:latest")
    assert str(model.tag) == "tiny:v1"
    assert stored_manifest("tiny:v1")["name"] == "tiny"
    assert model.info.metadata["signed_by"] == load_stored_pack(model.path).signed_by
    assert (Path(model.path) / "pack" / "model.onnx").read_bytes() == (
        signed_pack / "model.onnx"
    ).read_bytes()


def test_the_cli_imports_and_refuses_a_second_import_of_the_same_version(
    model_store: Path,
    signed_pack: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgebento.cli import main

    assert main(["bento", "import", str(signed_pack), "--pub", str(keys[1])]) == 0
    assert "tiny:v1" in capsys.readouterr().out
    with pytest.raises(VersionError):
        import_pack(signed_pack, [keys[1]])


def test_a_pack_signed_by_an_untrusted_key_is_not_imported(
    model_store: Path, signed_pack: Path, tmp_path: Path
) -> None:
    from modelpack import generate_keypair

    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError):
        import_pack(signed_pack, [other])
    assert not (model_store / "tiny").exists()


def test_a_stored_pack_changed_after_import_is_refused_at_serve_time(
    model_store: Path, signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    import bentoml

    import_pack(signed_pack, [keys[1]])
    stored = Path(bentoml.models.get("tiny:v1").path)
    model = stored / "pack" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_stored_pack(stored)


def test_an_unsigned_stored_pack_needs_an_explicit_opt_in(
    model_store: Path, signed_pack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bentoml

    (signed_pack / "manifest.sig").unlink()
    import_pack(signed_pack, allow_unsigned=True)
    stored = Path(bentoml.models.get("tiny:v1").path)
    monkeypatch.delenv("EDGEBENTO_TRUST", raising=False)
    monkeypatch.delenv("EDGEBENTO_ALLOW_UNSIGNED", raising=False)
    with pytest.raises(ConfigError, match="EDGEBENTO_TRUST"):
        load_stored_pack(stored)
    monkeypatch.setenv("EDGEBENTO_ALLOW_UNSIGNED", "1")
    assert load_stored_pack(stored).signed_by is None


def test_a_missing_trust_file_is_named(
    model_store: Path,
    signed_pack: Path,
    keys: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bentoml

    import_pack(signed_pack, [keys[1]])
    stored = Path(bentoml.models.get("tiny:v1").path)
    monkeypatch.setenv("EDGEBENTO_TRUST", str(tmp_path / "gone.pub"))
    with pytest.raises(ConfigError, match=r"gone\.pub \(EDGEBENTO_TRUST\) does not exist"):
        load_stored_pack(stored)
