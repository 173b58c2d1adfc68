"""Stopping a served container stops everything it started, even what left its process group:
the mechanism of tests/support/containers.py, on a process tree built to escape ``killpg``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.containers import stop_tree, wait_gone

# A parent in its own session (as `buildah run` is started) whose child makes a session of its
# own (as the container's processes are) and starts a grandchild that ignores SIGTERM.
TREE = """
import os, signal, subprocess, sys, time
if os.fork() == 0:
    os.setsid()
    subprocess.Popen([sys.executable, "-c",
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(600)", sys.argv[1]])
    time.sleep(600)
time.sleep(600)
"""


def _start_tree(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    import psutil

    ready = tmp_path / "ignoring-sigterm"  # the grandchild's handler is in place
    proc = subprocess.Popen([sys.executable, "-c", TREE, str(ready)], start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tree = psutil.Process(proc.pid).children(recursive=True)
        if len(tree) >= 2 and ready.exists():
            return proc, [p.pid for p in tree]
        time.sleep(0.05)
    raise AssertionError("the tree did not start")


def test_killing_the_process_group_leaves_the_escaped_tree_behind(tmp_path: Path) -> None:
    proc, tree = _start_tree(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_gone(tree, timeout=1) == tree  # the leak the old stop_group had
    finally:
        for pid in tree:
            os.kill(pid, signal.SIGKILL)


def test_stop_tree_stops_every_descendant_even_one_that_ignores_sigterm(tmp_path: Path) -> None:
    proc, tree = _start_tree(tmp_path)
    killed = stop_tree(proc, timeout=2)
    assert proc.returncode is not None
    assert wait_gone(tree) == []
    assert len(killed) == 1  # the grandchild ignored SIGTERM and needed SIGKILL
