"""What ``edgebento demo`` runs its steps with: commands shown as a user types them, background
processes that are all stopped on exit, on Ctrl-C and on SIGTERM, and the table of outcomes."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class Stopped(Exception):
    """SIGTERM reached the demo: unwind like Ctrl-C, stopping what it started."""


@dataclass
class Outcome:
    step: str
    ok: bool
    text: str


@dataclass
class Demo:
    workdir: Path
    results: list[Outcome] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stoppers: list[Callable[[], None]] = field(default_factory=list)

    # --- running things -----------------------------------------------------------------------

    def run(
        self,
        *args: str | Path,
        quiet: bool = False,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(a) for a in args]
        console.print(f"[dim]$[/dim] [bold]{shlex.join(_short(argv))}[/bold]")
        done = subprocess.run(
            argv, capture_output=quiet, text=True, cwd=REPO, env={**self.env, **(env or {})}
        )
        if check and done.returncode != 0:
            if quiet:
                console.print(done.stdout + done.stderr)
            raise RuntimeError(f"{shlex.join(_short(argv))} exited with {done.returncode}")
        return done

    def start(self, name: str, *args: str | Path, env: dict[str, str] | None = None) -> Any:
        """A background process; its stdout and stderr (JSON log lines) go to logs/NAME.log."""
        argv = [str(a) for a in args]
        console.print(f"[dim]$[/dim] [bold]{shlex.join(_short(argv))} &[/bold]")
        log = (self.workdir / "logs" / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**self.env, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches the demo, which stops these in order
        )
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        """SIGTERM the process's group (bentoml serve and its workers), then SIGKILL."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            self.stop(proc)
        for stopper in reversed(self.stoppers):
            with contextlib.suppress(Exception):
                stopper()
        self.processes.clear()
        self.stoppers.clear()

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BENTOML_HOME=str(self.workdir / "bentoml"),
            BENTOML_DO_NOT_TRACK="true",
            TF_CPP_MIN_LOG_LEVEL="3",
            EDGEBENTO_LOG_FORMAT="json",  # every background process logs JSON lines
            PATH=f"{BIN}:{env.get('PATH', '')}",
        )
        return env

    # --- outcomes -------------------------------------------------------------------------------

    def note(self, step: str, outcome: str, ok: bool = True) -> None:
        self.results.append(Outcome(step, ok, outcome))
        mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
        console.print(f"{mark} {step}: {outcome}")

    def attempt(self, step: str, action: Callable[[], str]) -> bool:
        """Run one step; a failure is noted in the table and the story goes on."""
        try:
            self.note(step, action())
            return True
        except (KeyboardInterrupt, Stopped):
            raise
        except Exception as exc:
            self.note(step, f"FAILED: {str(exc).splitlines()[0] if str(exc) else exc!r}", ok=False)
            return False

    @property
    def failed(self) -> list[str]:
        return [o.step for o in self.results if not o.ok]


def _short(argv: Sequence[str]) -> list[str]:
    """Show commands the way a user types them (no venv paths), passwords redacted: in broker
    URLs, and after mosquitto_pub/_sub/_rr's ``-P``."""
    from cloud_sync.redact import redact_text

    out = []
    for i, a in enumerate(argv):
        if a.startswith(str(BIN) + "/"):
            a = a[len(str(BIN)) + 1 :]
        shown = "***" if i and argv[i - 1] == "-P" else redact_text(a)
        out.append(shown.replace(str(REPO) + "/", ""))
    return out


def post(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read() or b"{}"
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"error": raw[:200].decode(errors="replace")}


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@contextlib.contextmanager
def section(title: str) -> Iterator[None]:
    console.rule(f"[bold cyan]{title}")
    start = time.perf_counter()
    yield
    console.print(f"[dim]({time.perf_counter() - start:.1f}s)[/dim]")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds the demo like Ctrl-C does, so ``finally`` stops everything."""

    def raise_stopped(*_: object) -> None:
        raise Stopped("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
