from __future__ import annotations

from pathlib import Path

import pytest

from modelpack import Pack, load_pack
from tests.unit.bentos.seqmodel import sequence_pack


@pytest.fixture
def seq_pack(tmp_path: Path, keys: tuple[Path, Path]) -> Pack:
    return load_pack(sequence_pack(tmp_path / "seq", keys[0]), [keys[1]])


@pytest.fixture
def mlp_pack(signed_pack: Path, keys: tuple[Path, Path]) -> Pack:
    return load_pack(signed_pack, [keys[1]])
