"""``edgebento simulate`` refuses device ids and prefixes that would not give each simulated
device topics of its own (a ``#`` in an id once hung the process past ``--duration``)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--id", "x#{}"], "device id 'x#0'"),
        (["--id", "a/{:d}"], "device id 'a/0'"),
        (["--id", "fixed"], "the device ids repeat"),
        (["--id", "{:0>70}"], "must be 1-64"),
        (["--prefix", "a/+/b"], "topic prefix 'a/+/b'"),
        (["--prefix", "a//b"], "topic prefix 'a//b'"),
    ],
)
def test_ids_and_prefixes_that_share_or_wildcard_topics_are_one_error(
    flags: list[str], says: str
) -> None:
    command = [sys.executable, "-m", "edgebento", "simulate", "--devices", "2"]
    done = subprocess.run(
        [*command, "--broker", "mqtt://127.0.0.1:1", "--duration", "1", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], done.stderr
