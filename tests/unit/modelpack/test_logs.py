"""The JSON log lines: one object per line, the documented keys, context where it exists."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest

from modelpack import logs


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook)
    monkeypatch.setenv(logs.ENV_FORMAT, "json")  # install() exports it; undone after the test
    logs.install("json", stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    sys.excepthook, threading.excepthook = saved[2], saved[3]
    logging.captureWarnings(False)
    logs.set_context(device=None, model=None)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_the_schema(captured: io.StringIO) -> None:
    logs.set_context(device="cam-1")
    logging.getLogger("edge_agent.agent").warning("two\nlines", extra={"request_id": "r-7"})
    (line,) = _lines(captured)
    assert set(line) == {"time", "level", "logger", "message", "device", "request_id"}
    assert line["level"] == "warning" and line["logger"] == "edge_agent.agent"
    assert line["message"] == "two\nlines" and line["device"] == "cam-1"
    assert line["request_id"] == "r-7" and str(line["time"]).endswith("+00:00")


def test_bound_context_holds_inside_the_block_only(captured: io.StringIO) -> None:
    log = logging.getLogger("cloud_sync.rollout")
    with logs.bound(rollout="ro-1", model="digits:v3"):
        log.info("aborting")
    log.info("after")
    first, second = _lines(captured)
    assert first["rollout"] == "ro-1" and first["model"] == "digits:v3"
    assert "rollout" not in second and "model" not in second


def test_exceptions_and_warnings_stay_one_line_each(captured: io.StringIO) -> None:
    try:
        raise ValueError('bad "quote" and\nnewline')
    except ValueError:
        logging.getLogger("x").exception("failed")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    err, warned = _lines(captured)
    assert "ValueError" in str(err["error"]) and err["level"] == "error"
    assert warned["logger"] == "py.warnings" and "deprecated thing" in str(warned["message"])


def test_default_is_json_off_a_terminal_and_the_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.ENV_FORMAT, raising=False)
    assert logs.default_format(io.StringIO()) == "json"
    monkeypatch.setenv(logs.ENV_FORMAT, "text")
    assert logs.default_format(io.StringIO()) == "text"


def test_a_crash_is_logged_as_json() -> None:
    code = "from modelpack import logs; logs.install('json'); raise RuntimeError('boom')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines[0]["level"] == "critical" and "boom" in str(lines[0]["message"])
