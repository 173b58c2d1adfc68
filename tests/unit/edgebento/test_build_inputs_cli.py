"""The CLI's boundary: whatever goes wrong below it, the user sees one ``error:`` line."""

from __future__ import annotations

from pathlib import Path

import pytest

import optimize
from edgebento.cli import main


def _fail_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def optimize_model(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(optimize, "optimize_model", optimize_model)


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            RuntimeError("boom\n  at depth"),
            "error: RuntimeError: boom (run with -v for the traceback)",
        ),
        (
            MemoryError("Unable to allocate 18.6 TiB for an array"),
            "error: out of memory: Unable to allocate 18.6 TiB for an array",
        ),
        (KeyError("x"), "error: KeyError: 'x' (run with -v for the traceback)"),
    ],
)
def test_an_unexpected_failure_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    exc: BaseException,
    line: str,
) -> None:
    _fail_with(monkeypatch, exc)
    assert main(["optimize", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err.splitlines() == [line]


def test_verbose_adds_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _fail_with(monkeypatch, RuntimeError("boom"))
    assert main(["-v", "optimize", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().endswith("error: RuntimeError: boom")
    assert "Traceback" in err
