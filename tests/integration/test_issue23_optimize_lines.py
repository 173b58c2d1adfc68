"""What ``edgebento optimize`` prints after its table, piped as CI or ``| tee`` runs it (80
columns, no ``COLUMNS``): each note, failed bound and the pick is one whole line (issue 23's
walk: piped, rich wrapped them at 80 columns, so ``accuracy@mean 0.8667 < 0.9150`` became two
lines and a grep for a note or the pick found half of it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.unit.optimize import shapes


def test_notes_failures_and_the_pick_are_one_line_each_when_piped(tmp_path: Path) -> None:
    model = shapes.several_inputs_scalar(tmp_path / "tagger.onnx")
    out = tmp_path / "pack"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "edgebento"),
            *("optimize", str(model), "--out", str(out), "--prune", "0.5"),
            *("--quantize", "dynamic", "--no-progress"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "EDGEBENTO_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    report = json.loads((out / "report.json").read_text())
    notes = [f"note: {note}" for note in report["notes"]]
    # Long enough that 80 columns would break them (the unsigned pack's note is 84 characters).
    assert any(len(note) > 80 for note in notes), notes
    for note in notes:
        assert note in lines, done.stdout
    assert f"chosen: {report['chosen']} ({report['reason']})" in lines, done.stdout
    for row in report["candidates"]:
        if row["error"] or row["violation"]:
            assert f"✗ {row['candidate']}: {row['error'] or row['violation']}" in lines


def test_a_failure_piped_is_one_json_record_and_text_on_request(tmp_path: Path) -> None:
    """docs/build-inputs.md, Errors: piped, a failure is one JSON log record with the text in
    ``message``; ``--log-format text`` gives the ``error:`` line (issue 23: the doc promised the
    line and the user saw the record)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "EDGEBENTO_LOG_FORMAT")}
    missing = tmp_path / "nope.onnx"
    edgebento = str(Path(sys.executable).parent / "edgebento")
    said: dict[tuple[str, ...], str] = {}
    for fmt in ((), ("--log-format", "text")):
        done = subprocess.run(
            [edgebento, *fmt, "optimize", str(missing), "--out", str(tmp_path / "p")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 1 and done.stdout == "", done
        (line,) = done.stderr.splitlines()  # one line, nothing else
        said[fmt] = line
    record = json.loads(said[()])
    assert record["level"] == "error" and f"{missing} does not exist" in record["message"]
    assert said[("--log-format", "text")] == f"error: {record['message']}"
