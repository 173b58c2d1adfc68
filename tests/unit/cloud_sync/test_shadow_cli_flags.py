"""``edgebento rollout --shadow`` refuses bad settings in one line naming the flag, before it
connects to anything (the broker named here does not exist)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgebento.cli import main


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--shadow-for", "2d"], "--shadow-for"),
        (["--shadow-for", "-5"], "--shadow-for"),
        (["--agreement", "1.5"], "--agreement"),
        (["--shadow-rate", "0"], "--shadow-rate"),
        (["--shadow-min-devices", "0"], "--shadow-min-devices"),
        (["--drift-gate", "-1"], "--drift-gate"),
    ],
)
def test_bad_shadow_settings_are_refused_naming_the_flag(
    flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["rollout", "tiny", "2", "--store", str(tmp_path), "--broker", "mqtt://127.0.0.1:1",
         "--key", str(tmp_path / "none.key"), "--devices", "a", "--shadow", *flags]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and named in err, err
    assert "Traceback" not in err
