"""Issue 19, finding 11, the files an agent is given: a TLS file that is missing, a ``--pack``
that is not there or a ``--data-dir`` that cannot be made stops a real ``edge-agent`` at start
with one ``error:`` line naming the flag. Before, the TLS files and the data directory ended in
a traceback at the first connect, and a missing ``--pack`` was ignored: the device started and
served nothing, with no word about the path. The same for the port a command listens on for
its metrics (``edgebento sync``, ``monitor``, ``rollout``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_trust_start_checks import _one_error, _run
from tests.support.agent import REPO

pytestmark = pytest.mark.slow


def _agent(tmp_path: Path, keys: tuple[Path, Path], *extra: str, data: Path | None = None) -> str:
    where = data if data is not None else tmp_path / "data"
    done = _run(
        "edge_agent", "run", "--device", "dev-a", "--broker", "mqtts://127.0.0.1:8883",
        "--data-dir", str(where), "--trust", str(keys[1]), "--log-format", "text", *extra,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    _one_error(done)
    return done.stderr.strip()


@pytest.mark.parametrize("flag", ["--ca-file", "--cert-file", "--claim-cert", "--claim-key"])
def test_a_missing_tls_file_stops_the_agent_naming_its_flag(
    tmp_path: Path, keys: tuple[Path, Path], flag: str
) -> None:
    missing = tmp_path / "nowhere" / "file.pem"
    pair = {"--cert-file": "--key-file", "--claim-cert": "--claim-key"}
    extra = [flag, str(missing)]
    if flag in pair:  # the other half of the pair exists: the missing one is named
        extra += [pair[flag], str(keys[0])]
    line = _agent(tmp_path, keys, *extra)
    assert line == f"error: {flag} {missing}: No such file or directory"
    assert not (tmp_path / "data").exists()  # stopped before it made anything


def test_a_pack_that_is_not_there_stops_the_agent(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    missing = tmp_path / "packs" / "tiny-v1"
    line = _agent(tmp_path, keys, "--pack", str(missing))
    assert line == f"error: --pack {missing}: no such file or directory"


def test_a_data_dir_that_cannot_be_made_stops_the_agent(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data = blocker / "data"  # no one, root included, can make a directory under a file
    line = _agent(tmp_path, keys, data=data)
    assert line == f"error: --data-dir {data}: Not a directory"


@pytest.mark.parametrize(
    "command",
    [
        ["sync", "--broker", "mqtt://127.0.0.1:1", "--metrics-port", "99999"],
        ["monitor", "--metrics-port", "70000"],
        ["rollout", "tiny", "2", "--broker", "mqtt://127.0.0.1:1", "--devices", "a",
         "--metrics-port", "-1"],
    ],
    ids=["sync", "monitor", "rollout"],
)  # fmt: skip
def test_a_metrics_port_that_cannot_be_bound_stops_the_command_before_it_works(
    tmp_path: Path, keys: tuple[Path, Path], command: list[str]
) -> None:
    """Before, an OverflowError from bind() after the work had begun (monitor had written its
    report by then), not naming the flag."""
    store = tmp_path / "store"
    extra = ["--store", str(store)] + (["--key", str(keys[0])] if command[0] == "rollout" else [])
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", "--log-format", "text", *command, *extra],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    port = command[command.index("--metrics-port") + 1]
    _one_error(done, f"--metrics-port {port}: is not a port")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no report, no store


@pytest.mark.parametrize(
    "command",
    [
        ["sync", "--store", "store"],
        ["fleet", "status"],
        ["simulate", "--devices", "1", "--duration", "1"],
    ],
    ids=["sync", "fleet-status", "simulate"],
)
def test_a_broker_port_that_cannot_work_is_named_by_its_flag(
    tmp_path: Path, command: list[str]
) -> None:
    """Before, ``broker URL ... has a bad port`` without the flag, from wherever it was read."""
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", "--log-format", "text", *command,
         "--broker", "mqtt://fleetop:S3cret@127.0.0.1:99999"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    _one_error(done, "--broker mqtt://fleetop:***@127.0.0.1:99999", "is not 1-65535")
    assert "S3cret" not in done.stderr
