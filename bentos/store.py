"""ModelPacks in the BentoML model store: verified on the way in, re-checked on the way out.

A stored model is a directory holding ``pack/`` (the pack, byte for byte) and ``trusted.pub``
(the key it was verified against at import, so the service can re-verify the same pack later
without being told the key again). The manifest is kept as the model's metadata, which is what
``bentoml models get NAME:vN`` shows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelpack import Pack, load_pack
from modelpack.errors import ConfigError, PackError

PACK_DIR = "pack"
TRUST_FILE = "trusted.pub"
MODULE = "edgebento.modelpack"


def model_tag(pack: Pack) -> str:
    """``NAME:vVERSION``: the tag a pack is stored under."""
    return f"{pack.manifest.name}:v{pack.manifest.version}"


def import_pack(
    pack_dir: Path | str,
    trusted: Sequence[Path | str] = (),
    *,
    allow_unsigned: bool = False,
) -> str:
    """Verify ``pack_dir`` against ``trusted`` and save it to the BentoML model store.

    Returns the tag (``NAME:vVERSION``). A tag that is taken already is refused with a
    VersionError: a version names one pack, forever.
    """
    import bentoml
    from bentoml.exceptions import BentoMLException

    from modelpack.errors import VersionError

    pack = load_pack(pack_dir, trusted, allow_unsigned=allow_unsigned)
    tag = model_tag(pack)
    try:
        bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        pass
    else:
        raise VersionError(f"{tag} is in the BentoML model store already; publish a new version")
    # BentoML metadata holds no None; every None in a manifest is a field's default anyway.
    manifest = pack.manifest.model_dump(mode="json", exclude_none=True)
    try:
        with bentoml.models.create(
            tag,
            module=MODULE,
            labels={"framework": "onnx", "signed_by": pack.signed_by or "unsigned"},
            metadata={
                "manifest": manifest,
                "manifest_sha256": pack.manifest_sha256,
                "signed_by": pack.signed_by or "unsigned",
            },
        ) as model:
            target = Path(model.path)
            shutil.copytree(pack.root, target / PACK_DIR, symlinks=False)
            if trusted and pack.signed_by is not None:
                shutil.copyfile(_signing_key(trusted, pack.signed_by), target / TRUST_FILE)
    except BentoMLException as exc:
        raise PackError(f"cannot save {tag} to the BentoML model store: {exc}") from exc
    return tag


def _signing_key(trusted: Sequence[Path | str], key_id: str) -> Path:
    from modelpack import load_public_key

    for path in trusted:
        if load_public_key(path).key_id == key_id:
            return Path(path)
    raise ConfigError(f"no trusted key has id {key_id}")  # load_pack made sure one has


def load_stored_pack(model_path: Path | str, trust: Path | str | None = None) -> Pack:
    """Re-verify a stored pack before serving it.

    ``trust`` (or ``EDGEBENTO_TRUST``) overrides the key saved at import; a pack imported
    unsigned is served only when ``EDGEBENTO_ALLOW_UNSIGNED=1`` says so.
    """
    root = Path(model_path)
    trust = trust or os.environ.get("EDGEBENTO_TRUST") or None
    if trust and not Path(trust).exists():
        raise ConfigError(f"the trusted key {trust} (EDGEBENTO_TRUST) does not exist")
    key = Path(trust) if trust else root / TRUST_FILE
    if key.exists():
        return load_pack(root / PACK_DIR, [key], check_model=False)
    if os.environ.get("EDGEBENTO_ALLOW_UNSIGNED") == "1":
        return load_pack(root / PACK_DIR, [], allow_unsigned=True, check_model=False)
    raise ConfigError(
        f"{root.name}: no trusted key to verify the pack against; set EDGEBENTO_TRUST "
        "or import the pack with --pub"
    )


def stored_manifest(tag: str) -> dict[str, Any]:
    """The manifest kept as metadata of a stored model."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ConfigError(f"{tag} is not in the BentoML model store") from exc
    except (ValueError, BentoMLException) as exc:  # not a tag at all
        raise ConfigError(f"{tag!r} is not a model tag like digits:v1: {exc}") from exc
    manifest = model.info.metadata.get("manifest", {})
    return dict(manifest) if isinstance(manifest, dict) else {}
