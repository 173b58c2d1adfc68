"""Model updates: fetch, verify, stage, fsync, atomic rename, health check, record, swap, rollback.

The one source of truth for what runs is ``state.json`` in the data dir, replaced atomically
after the new pack passed its health check and *before* its session goes live: a failure to
write it leaves the old model serving and the state saying so, and ``kill -9`` at any step
leaves a device that serves exactly the old or the new pack after restart. ``state.json`` also
keeps, per model name, the highest version ever installed (TUF's rollback rule): nothing at or
below it installs without a signed rollback instruction (``edge_agent.trust``). What a pack
must pass before it is recorded (signature, version, golden samples) is ``edge_agent.pack_checks``.

A new install of an expired pack is refused; a pack that expires after it was installed keeps
serving across reboots with ``expired`` on the status (``refuse_expired`` turns that off: the
device then serves nothing, never an earlier pack below its high-water mark).
Downloads happen outside the install lock, so a rollback never waits behind one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.redact import redact_text, redact_url
from edge_agent.config import AgentConfig
from edge_agent.fetch import FetchPolicy, fetch_named, fetch_url
from edge_agent.health import HealthCheckError
from edge_agent.inference import InferenceService
from edge_agent.memory import release_freed_memory
from edge_agent.pack_checks import PackChecks, label
from edge_agent.state import InstallState, fsync_dir, fsync_tree, read_state, write_state
from edge_agent.updates import CancelledError, CancelToken, UpdateWorker
from modelpack.errors import EdgebentoError, ExpiredError, PackError
from modelpack.pack import Pack
from modelpack.predictor import Predictor

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]
Fetch = Callable[[Path], Path]

__all__ = ["HealthCheckError", "InstallState", "Updater"]


class Updater:
    def __init__(
        self,
        config: AgentConfig,
        inference: InferenceService,
        report: Report,
        worker: UpdateWorker | None = None,
    ) -> None:
        self.config = config
        self.inference = inference
        self.report = report
        self.worker = worker or UpdateWorker(lambda: config.download_deadline_s)
        self.packs_dir = config.data_dir / "packs"
        self.staging_dir = config.data_dir / "staging"
        self.state_file = config.data_dir / "state.json"
        self.current: Pack | None = None
        # The installed pack refused at boot because it expired (``refuse_expired``): nothing
        # is served then, rather than an older pack below the high-water mark.
        self.expired_refused: str | None = None
        self.last_update: dict[str, Any] | None = None
        self.applied: dict[str, Any] | None = None  # set by edge_agent.trust per generation
        self.outcomes: dict[str, int] = {}  # update attempts by outcome, for /metrics
        self._lock = threading.Lock()
        # Held while the served model and the outcome that names it change together, and by
        # the status while it reads them: no status names the new model with the old outcome.
        self.live = threading.RLock()
        self.checks = PackChecks(config, self.highest)

    @property
    def expired(self) -> bool:
        if self.expired_refused is not None and self.current is None:
            return True
        return self.current is not None and self.current.manifest.expired

    def policy(self, own_token: bool = False) -> FetchPolicy:
        """Fetch limits; the update worker's cancel token, or (a rollback, which runs beside
        the worker and has just cancelled it) a token of its own with the same deadline."""
        token = CancelToken(self.config.download_deadline_s) if own_token else self.worker.token
        return FetchPolicy(tuple(self.config.file_roots), self.config.max_download_bytes, token)

    # --- state -------------------------------------------------------------------------------

    def read_state(self) -> InstallState:
        return read_state(self.state_file, self.packs_dir)

    def highest(self, name: str) -> int | None:
        return self.read_state().mark(name)

    def _write_state(self, state: InstallState) -> None:
        write_state(self.state_file, state)

    def _record(self, state: InstallState) -> None:
        """Write the state before the new session goes live; on failure nothing changed."""
        try:
            self._write_state(state)
        except OSError as exc:
            raise PackError(
                f"cannot record the update in state.json: {exc.strerror or exc}; "
                f"still serving {label(self.current)}"
            ) from exc

    # --- boot ----------------------------------------------------------------------------------

    def boot(self, initial: Path | None) -> None:
        """Serve the installed pack (verified again), else the --pack, else nothing yet."""
        for path in (self.packs_dir, self.staging_dir):
            path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging_dir, ignore_errors=True)  # half-done work of a killed run
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        state = self.read_state()
        for index, dirname in enumerate([state.current, *state.history]):
            if dirname is None:
                continue
            try:
                # Verified when installed: the clock passing expires_at since must not take
                # the device dark (TUF's freeze rule is for new installs).
                pack = self.checks.verify(self.packs_dir / dirname, installed=True)
                self._go_live(pack, self.checks.load(pack))
            except ExpiredError as exc:
                if index == 0:
                    # Falling back to an earlier pack would turn withheld updates into a
                    # downgrade below the high-water mark: serve nothing, say why, alert.
                    self.refuse_expired_pack(dirname, exc)
                    return
                log.error("installed pack %s is not usable: %s", dirname, exc)
                continue
            except EdgebentoError as exc:
                log.error("installed pack %s is not usable: %s", dirname, exc)
                self.report({"event": "boot_refused", "pack": dirname, "error": str(exc)})
                continue
            if index:
                self._write_state(
                    dataclasses.replace(state, current=dirname, history=state.history[index:])
                )
            if pack.manifest.expired:
                when = str(pack.manifest.expires_at)
                log.warning("serving %s, which expired at %s", dirname, when)
                self.report({"event": "expired", "pack": dirname, "expires_at": when})
            return
        if initial is not None:
            # The operator's own --pack: any local path the agent can read.
            own = FetchPolicy((initial.resolve().parent,), self.config.max_download_bytes)
            self._install(lambda t: fetch_url(str(initial), t, own), str(initial), "boot")

    def refuse_expired_pack(self, dirname: str, exc: ExpiredError, trigger: str = "boot") -> None:
        """Serve nothing in place of an expired pack: at boot, or once it expires serving."""
        self.expired_refused = dirname
        message = (
            f"serving no model: {dirname} has expired ({exc}) and refuse_expired is on; "
            "an earlier pack is not served in its place (it would be a downgrade): deploy a "
            "newer pack, or roll back with a signed instruction"
        )
        self._outcome("refused", message, trigger, failed=True, expired=dirname)

    # --- deploy and rollback -------------------------------------------------------------------

    def deploy_url(self, url: str, trigger: str = "command") -> dict[str, Any]:
        policy = self.policy()
        return self._install(lambda t: fetch_url(url, t, policy), url, trigger)

    def deploy_named(self, name: str, version: int, trigger: str = "command") -> dict[str, Any]:
        cur = self.current
        if cur is not None and (cur.manifest.name, cur.manifest.version) == (name, version):
            return self._outcome("unchanged", f"{name} v{version} is already running", trigger)
        return self._install(self._named(name, version), f"{name} v{version}", trigger)

    def _named(self, name: str, version: int, policy: FetchPolicy | None = None) -> Fetch:
        policy, store = policy or self.policy(), self.config.store
        return lambda target: fetch_named(store, name, version, target, policy)

    def rollback_to(
        self, name: str, version: int, url: str | None = None, trigger: str = "command"
    ) -> dict[str, Any]:
        """Go back to exactly ``name`` v``version`` (the caller checked the authority).

        The copy kept as an earlier good pack is preferred, matched by its verified manifest
        (never by a directory name); if there is none (or it no longer verifies), the pack is
        fetched from ``url`` or through the store and must be that very version.
        """
        with self._lock:
            state = self.read_state()
            for index, dirname in enumerate(state.history):
                try:
                    pack = self.checks.verify(self.packs_dir / dirname, installed=True)
                    if (pack.manifest.name, pack.manifest.version) != (name, version):
                        continue
                    predictor = self.checks.load(pack)
                    health = self.checks.health(pack, predictor)
                except EdgebentoError as exc:
                    log.warning("the kept copy %s is not usable (%s)", dirname, exc)
                    continue
                self._record(
                    dataclasses.replace(state, current=dirname, history=state.history[index + 1 :])
                )
                return self._go_live_with(
                    pack,
                    predictor,
                    "rolled_back",
                    f"rolled back to {label(pack)} (the copy kept on the device)",
                    trigger,
                    health=health,
                )
        policy = self.policy(own_token=True)
        fetch = (lambda t: fetch_url(url, t, policy)) if url else self._named(name, version, policy)
        return self._install(fetch, url or f"{name} v{version}", trigger, (name, version))

    def previous(self) -> tuple[str, int] | None:
        """The (name, version) of the newest earlier good pack, read from its manifest."""
        for dirname in self.read_state().history:
            try:
                pack = self.checks.verify(self.packs_dir / dirname, installed=True)
            except EdgebentoError:
                continue
            return pack.manifest.name, pack.manifest.version
        return None

    def refuse(self, message: str, trigger: str, **extra: Any) -> dict[str, Any]:
        """Report an update that was refused before anything was fetched."""
        return self._outcome("refused", message, trigger, **extra)

    def _install(
        self,
        fetch: Fetch,
        source: str,
        trigger: str,
        rollback_to: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        shown = redact_url(source)
        staging = self.staging_dir / uuid.uuid4().hex
        try:
            try:
                fetched = fetch(staging)  # outside the lock: a rollback never waits for it
                with self._lock:
                    return self._install_locked(fetched, shown, trigger, rollback_to)
            except OSError as exc:  # a full or read-only disk while staging
                raise PackError(f"cannot stage {shown}: {exc.strerror or exc}") from exc
        except EdgebentoError as exc:
            outcome = (
                "rolled_back"
                if isinstance(exc, HealthCheckError)
                else "cancelled"
                if isinstance(exc, CancelledError)
                else "refused"
            )
            self._outcome(outcome, redact_text(str(exc)), trigger, failed=True, source=shown)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install_locked(
        self, fetched: Path, source: str, trigger: str, rollback_to: tuple[str, int] | None
    ) -> dict[str, Any]:
        pack = self.checks.verify(fetched)
        cur = self.current
        if cur is not None and cur.manifest_sha256 == pack.manifest_sha256:
            return self._outcome("unchanged", f"{label(pack)} is already running", trigger)
        self.checks.check_version(pack, source, rollback_to)
        m = pack.manifest
        final = self.packs_dir / f"{m.name}-v{m.version}-{pack.manifest_sha256[:12]}"
        if final.exists() and (cur is None or cur.root != final):
            shutil.rmtree(final)  # a copy from an earlier failed attempt: not live, not trusted
        fsync_tree(fetched)
        os.rename(fetched, final)
        fsync_dir(self.packs_dir)
        pack = dataclasses.replace(pack, root=final)
        predictor = self.checks.load(pack)
        try:
            health = self.checks.health(pack, predictor)
        except HealthCheckError as exc:
            shutil.rmtree(final, ignore_errors=True)
            back = f"; still serving {label(cur)}" if cur is not None else ""
            raise HealthCheckError(f"{exc}; rolled back automatically{back}") from exc
        state = self.read_state()
        # History holds earlier good packs only: a rollback does not keep the pack it left.
        history = state.history
        if cur is not None and rollback_to is None:
            history = (cur.root.name, *history)
        history = tuple(d for d in history if d != final.name)[: self.config.keep_packs - 1]
        new = dataclasses.replace(  # keeps the generations applied
            state, current=final.name, history=history, highest=state.raised(m.name, m.version)
        )
        try:
            self._record(new)
        except PackError:
            shutil.rmtree(final, ignore_errors=True)
            raise
        if rollback_to is not None:
            outcome, message = (
                "rolled_back",
                f"rolled back to {label(pack)} (fetched from {source})",
            )
        else:
            outcome, message = "installed", f"now serving {label(pack)}"
        result = self._go_live_with(pack, predictor, outcome, message, trigger, health=health)
        self._prune(final.name, history)
        return result

    def stage_beside(self, name: str, version: int, staging: Path) -> tuple[Pack, Predictor]:
        """``name`` v``version`` fetched from the store into ``staging`` and checked as an
        install checks it (signature, hashes, the name and version asked, above the highest
        installed, golden samples within the latency budget), then loaded, but neither recorded
        nor served: a shadow runs it beside the live model (``edge_agent.shadow``). Raises what
        an install raises; ``staging`` stays the caller's to remove."""
        return self.checks.staged(self._named(name, version)(staging), name, version)

    # --- steps ---------------------------------------------------------------------------------

    def _go_live(self, pack: Pack, predictor: Predictor) -> None:
        samples = pack.samples
        old = self.inference.swap(predictor, samples.inputs if samples is not None else None)
        self.current = pack
        if old is not None:
            del old  # requests in flight hold their own reference and finish on it
            release_freed_memory()

    def _go_live_with(
        self,
        pack: Pack,
        predictor: Predictor,
        outcome: str,
        message: str,
        trigger: str,
        **extra: Any,
    ) -> dict[str, Any]:
        with self.live:
            self._go_live(pack, predictor)
            return self._outcome(outcome, message, trigger, **extra)

    def _prune(self, live: str, history: tuple[str, ...]) -> None:
        keep = {live, *history[: self.config.keep_packs - 1]}
        for path in self.packs_dir.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _outcome(
        self, outcome: str, message: str, trigger: str, *, failed: bool = False, **extra: Any
    ) -> dict[str, Any]:
        # One log line per update outcome: what an operator reading the journal looks for.
        level = logging.WARNING if failed or outcome in ("refused", "cancelled") else logging.INFO
        log.log(level, "update %s (%s): %s", outcome, trigger, redact_text(message))
        result = {
            "event": "update",
            "outcome": outcome,
            "message": redact_text(message),
            "trigger": trigger,
            "model": None if self.current is None else self.current.manifest.model_ref,
            "ts": time.time(),
            **extra,
        }
        with self.live:
            self.last_update = result
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.report(result)
        return result
