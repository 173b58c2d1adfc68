"""The commands that serve and build the service from wherever the user is.

``bentoml serve .`` and ``bentoml build .`` read ``bentofile.yaml`` from the current directory,
so they work only at the root of edgebento's own source. Serving names the service by its import
path instead, which any folder can; a build is given edgebento's source root as its context
(the checkout of an editable install, or site-packages), where ``bentofile.yaml``'s includes
resolve.
"""

from __future__ import annotations

import os
from pathlib import Path

from modelpack.errors import ConfigError, PackError

SERVICE = "bentos.service:EdgebentoService"
BENTOFILE = "bentofile.yaml"


def serve_command(model_tag: str) -> str:
    """The shell command that serves ``model_tag`` from any folder."""
    return f"EDGEBENTO_MODEL={model_tag} bentoml serve {SERVICE}"


def source_root() -> Path:
    """The directory that holds the ``bentos``, ``modelpack`` and ``cloud_sync`` packages."""
    import bentos

    return Path(bentos.__file__).resolve().parents[1]


def build_bento(model_tag: str) -> str:
    """Build a bento that serves ``model_tag`` (a model in the BentoML store); its tag."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    from bentos.store import stored_manifest

    root = source_root()
    bentofile = root / BENTOFILE
    if not bentofile.is_file():
        raise ConfigError(
            f"no {BENTOFILE} beside the installed edgebento ({root}); install edgebento from "
            "its source (pip install -e) to build bentos"
        )
    stored_manifest(model_tag)  # a clear error for a tag that is not in the model store
    # The build imports the service, which reads the model's tag from the environment.
    before = os.environ.get("EDGEBENTO_MODEL")
    os.environ["EDGEBENTO_MODEL"] = model_tag
    try:
        bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(root))
    except BentoMLException as exc:
        raise PackError(f"cannot build a bento of {model_tag}: {exc}") from exc
    finally:
        if before is None:
            os.environ.pop("EDGEBENTO_MODEL", None)
        else:
            os.environ["EDGEBENTO_MODEL"] = before
    return str(bento.tag)
