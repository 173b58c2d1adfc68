"""Running buildah from the container tests: a command that must succeed, a container from an
image that is removed afterwards, and stopping everything a served container started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def run_checked(cmd: list[str], env: dict[str, str], timeout: float = 900, cwd: Path = REPO) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd[:3])}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


@contextmanager
def working_container(image: str, env: dict[str, str]) -> Iterator[str]:
    """``buildah from image``; the container is removed on exit."""
    ctr = run_checked(["buildah", "from", image], env).strip()
    try:
        yield ctr
    finally:
        subprocess.run(["buildah", "rm", ctr], env=env, capture_output=True)


def container_root(ctr: str, env: dict[str, str]) -> Path:
    """The directory a chroot-isolated ``buildah run`` of ``ctr`` makes its processes' root."""
    return Path(run_checked(["buildah", "mount", ctr], env).strip()).resolve()


def processes_rooted_in(root: Path) -> list[psutil.Process]:
    """Every live process whose root directory is ``root``: what runs inside the container,
    whoever its parent is now (an orphan is reparented to 1 and leaves every process group)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if Path(os.readlink(f"/proc/{proc.pid}/root")).resolve() == root:
                found.append(proc)
        except (OSError, psutil.Error):
            continue  # gone, or not ours to look at
    return found


def stop_tree(
    proc: subprocess.Popen[bytes], root: Path | None = None, timeout: float = 20.0
) -> list[int]:
    """Stop ``proc``, everything it started and (with ``root``) everything rooted in ``root``.

    A process group is not enough: ``buildah run`` puts the container's processes in a session of
    their own, and BentoML's workers outlive an arbiter that dies first. So the whole tree is
    collected before a signal is sent, SIGTERM goes to all of it, and SIGKILL to what is left
    after ``timeout``. Returns the pids that had to be killed.
    """
    try:
        top = psutil.Process(proc.pid)
        victims = {top, *top.children(recursive=True)}
    except psutil.NoSuchProcess:
        victims = set()
    if root is not None:
        victims.update(processes_rooted_in(root))
    if proc.poll() is None:
        with _suppress_gone():
            os.killpg(proc.pid, signal.SIGTERM)  # buildah run and its group, as a terminal would
    for victim in victims:
        with _suppress_gone():
            victim.terminate()
    _, alive = psutil.wait_procs(list(victims), timeout=timeout)
    # Late children (a worker respawned during shutdown) are found again before the KILL.
    if root is not None:
        alive = list({*alive, *processes_rooted_in(root)})
    for victim in alive:
        with _suppress_gone():
            victim.kill()
    psutil.wait_procs(alive, timeout=5)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)
    return [p.pid for p in alive]


def _suppress_gone() -> suppress:
    return suppress(ProcessLookupError, psutil.NoSuchProcess, PermissionError)


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids among ``pids`` still alive after ``timeout`` (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
