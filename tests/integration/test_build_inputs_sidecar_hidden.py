"""An ONNX model kept in a home directory must not reach ``~/.aws`` without leaving it.

External data may be read from the model's own directory; a model saved in ``$HOME`` (or a
download folder beside dotfiles) could name ``.aws/credentials`` as the sidecar of a tensor whose
dims match the file's size, and the secret would be inlined into the signed pack. Hidden files
and directories are refused, through the real CLI, and the secret is written nowhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.integration.test_build_inputs import _external, _optimize, _refused

pytestmark = pytest.mark.slow

SECRET = b"aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"


def _aim_first_tensor_at_credentials(source: Path) -> bytes:
    """The first initializer's bytes moved to ``.aws/credentials`` (filled with the secret)."""
    model = onnx.load(str(source), load_external_data=False)
    tensor = model.graph.initializer[0]
    size = (
        int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    )
    secret = (SECRET * (size // len(SECRET) + 1))[:size]
    hidden = source.parent / ".aws" / "credentials"
    hidden.parent.mkdir()
    hidden.write_bytes(secret)
    entries = {e.key: e for e in tensor.external_data}
    entries["location"].value = ".aws/credentials"
    entries["offset"].value = "0"
    entries["length"].value = str(size)
    onnx.save(model, str(source))
    return secret


def test_a_sidecar_in_a_hidden_directory_is_refused_and_copied_nowhere(tmp_path: Path) -> None:
    source = _external(tmp_path / "home")
    secret = _aim_first_tensor_at_credentials(source)
    done, _ = _optimize(tmp_path, source, "--prune", "off", "--quantize", "off")
    line = _refused(done, tmp_path)
    assert line == (
        "error: mlp.onnx: external data '.aws/credentials' is hidden or in a hidden directory,"
        " where credentials live, not weights; it is not read: keep the model's data in"
        " plainly named files beside it"
    )
    written = [p for p in tmp_path.rglob("*") if p.is_file() and ".aws" not in p.parts]
    assert [p for p in written if SECRET[:32] in p.read_bytes()] == []
    assert secret[:32] not in (done.stdout + done.stderr).encode()
