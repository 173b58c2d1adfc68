"""Model updates: fetch, verify, stage, fsync, atomic rename, health check, swap, and rollback.

The one source of truth for what runs is ``state.json`` in the data dir, replaced atomically
only after the new pack passed its health check; ``kill -9`` at any step therefore leaves a
device that serves exactly the old or the new pack after restart. Packs are verified with
``load_pack(check_model=False)``: the publisher ran onnx.checker before signing, and the
signature proves it, so a device needs neither the onnx package nor its ~15 MB of memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.fetch import fetch_named, fetch_url
from edge_agent.inference import InferenceService
from modelpack.errors import EdgebentoError, PackError, VersionError
from modelpack.loader import load_pack
from modelpack.pack import Pack
from modelpack.predictor import Predictor, PredictorOptions

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]


class HealthCheckError(PackError):
    """A pack that verified but does not reproduce its golden samples or is too slow."""


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a rename cannot expose half a pack."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class InstallState:
    current: str | None = None
    history: tuple[str, ...] = ()  # earlier good packs, newest first: where rollback goes


class Updater:
    def __init__(self, config: AgentConfig, inference: InferenceService, report: Report) -> None:
        self.config = config
        self.inference = inference
        self.report = report
        self.packs_dir = config.data_dir / "packs"
        self.staging_dir = config.data_dir / "staging"
        self.state_file = config.data_dir / "state.json"
        self.current: Pack | None = None
        self.last_update: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.options = PredictorOptions(intra_op_threads=config.intra_op_threads)

    # --- state -------------------------------------------------------------------------------

    def read_state(self) -> InstallState:
        try:
            raw = json.loads(self.state_file.read_text())
            return InstallState(raw.get("current"), tuple(raw.get("history", ())))
        except FileNotFoundError:
            return InstallState()
        except (OSError, ValueError) as exc:
            log.error("state.json is unreadable (%s); starting from the packs on disk", exc)
            return InstallState()

    def _write_state(self, state: InstallState) -> None:
        tmp = self.state_file.with_name(".state.json.tmp")
        body = {"schema_version": 1, "current": state.current, "history": list(state.history)}
        with tmp.open("w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_file)
        fsync_dir(self.state_file.parent)

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
                pack = self._verify(self.packs_dir / dirname)
                self._go_live(pack, self._load_predictor(pack))
            except EdgebentoError as exc:
                log.error("installed pack %s is not usable: %s", dirname, exc)
                self.report({"event": "boot_refused", "pack": dirname, "error": str(exc)})
                continue
            if index:
                self._write_state(InstallState(dirname, state.history[index:]))
            return
        if initial is not None:
            self._install(lambda target: fetch_url(str(initial), target), str(initial), "boot")

    # --- deploy and rollback -------------------------------------------------------------------

    def deploy_url(self, url: str, trigger: str = "command") -> dict[str, Any]:
        return self._install(lambda target: fetch_url(url, target), url, trigger)

    def deploy_named(self, name: str, version: int, trigger: str = "command") -> dict[str, Any]:
        cur = self.current
        if cur is not None and (cur.manifest.name, cur.manifest.version) == (name, version):
            return self._outcome("unchanged", f"{name} v{version} is already running", trigger)
        return self._install(
            lambda target: fetch_named(self.config.store, name, version, target),
            f"{name} v{version}",
            trigger,
        )

    def rollback(self, version: int | None = None) -> dict[str, Any]:
        """Go back to the previous good pack (or the one with ``version``): the only downgrade."""
        with self._lock:
            state = self.read_state()
            choices = [d for d in state.history if version is None or f"-v{version}-" in f"{d}-"]
            if not choices:
                raise VersionError(
                    "no earlier pack to roll back to"
                    if version is None
                    else f"version {version} is not among the earlier packs on this device"
                )
            target = choices[0]
            pack = self._verify(self.packs_dir / target)
            self._health_check(pack, predictor := self._load_predictor(pack))
            self._go_live(pack, predictor)
            rest = state.history[state.history.index(target) + 1 :]
            self._write_state(InstallState(target, rest))
            return self._outcome("rolled_back", f"rolled back to {self._label(pack)}", "command")

    def rollback_to(
        self, name: str, version: int, url: str | None = None, trigger: str = "desired"
    ) -> dict[str, Any]:
        """Go back to exactly ``name`` v``version``, as a desired state with ``rollback`` asks.

        The copy kept as an earlier good pack is preferred; if there is none (or it no longer
        verifies), the pack is fetched from ``url`` or through the store. Either way it is
        verified with the trusted keys and health-checked, and it must be that very version:
        never below what the desired state names.
        """
        with self._lock:
            state = self.read_state()
            for index, dirname in enumerate(state.history):
                if not dirname.startswith(f"{name}-v{version}-"):
                    continue
                try:
                    pack = self._verify(self.packs_dir / dirname)
                    predictor = self._load_predictor(pack)
                    health = self._health_check(pack, predictor)
                except EdgebentoError as exc:
                    log.warning("the kept copy %s is not usable (%s); fetching it", dirname, exc)
                    continue
                self._go_live(pack, predictor)
                self._write_state(InstallState(dirname, state.history[index + 1 :]))
                return self._outcome(
                    "rolled_back",
                    f"rolled back to {self._label(pack)} (the copy kept on the device)",
                    trigger,
                    health=health,
                )
        if url:
            return self._install(
                lambda target: fetch_url(url, target), url, trigger, (name, version)
            )
        return self._install(
            lambda target: fetch_named(self.config.store, name, version, target),
            f"{name} v{version}",
            trigger,
            (name, version),
        )

    def refuse(self, message: str, trigger: str, **extra: Any) -> dict[str, Any]:
        """Report an update that was refused before anything was fetched."""
        return self._outcome("refused", message, trigger, **extra)

    def _install(
        self,
        fetch: Callable[[Path], Path],
        source: str,
        trigger: str,
        rollback_to: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            staging = self.staging_dir / uuid.uuid4().hex
            try:
                try:
                    return self._install_locked(fetch, source, trigger, staging, rollback_to)
                except OSError as exc:  # a full or read-only disk while staging
                    raise PackError(f"cannot stage {source}: {exc.strerror or exc}") from exc
            except EdgebentoError as exc:
                outcome = "rolled_back" if isinstance(exc, HealthCheckError) else "refused"
                self._outcome(outcome, str(exc), trigger, source=source)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _install_locked(
        self,
        fetch: Callable[[Path], Path],
        source: str,
        trigger: str,
        staging: Path,
        rollback_to: tuple[str, int] | None,
    ) -> dict[str, Any]:
        fetched = fetch(staging)
        pack = self._verify(fetched)
        cur = self.current
        if rollback_to is not None:
            if (pack.manifest.name, pack.manifest.version) != rollback_to:
                raise VersionError(
                    f"{source} holds {self._label(pack)}, not the {rollback_to[0]} "
                    f"v{rollback_to[1]} the rollback asks for"
                )
        elif cur is not None and cur.manifest.name == pack.manifest.name:
            if cur.manifest_sha256 == pack.manifest_sha256:
                return self._outcome(
                    "unchanged", f"{self._label(pack)} is already running", trigger
                )
            if pack.manifest.version <= cur.manifest.version:
                raise VersionError(
                    f"{self._label(pack)} is not newer than the running v{cur.manifest.version}; "
                    "a downgrade needs an explicit rollback"
                )
        final = (
            self.packs_dir
            / f"{pack.manifest.name}-v{pack.manifest.version}-{pack.manifest_sha256[:12]}"
        )
        if final.exists():
            shutil.rmtree(final)  # a copy from an earlier failed attempt: not live, not trusted
        fsync_tree(fetched)
        os.rename(fetched, final)
        fsync_dir(self.packs_dir)
        pack = dataclasses.replace(pack, root=final)
        predictor = self._load_predictor(pack)
        try:
            health = self._health_check(pack, predictor)
        except HealthCheckError as exc:
            shutil.rmtree(final, ignore_errors=True)
            back = f"; still serving {self._label(cur)}" if cur is not None else ""
            raise HealthCheckError(f"{exc}; rolled back automatically{back}") from exc
        old = self.current
        self._go_live(pack, predictor)
        state = self.read_state()
        # History holds earlier good packs only: a rollback does not keep the pack it left.
        history = state.history
        if old is not None and rollback_to is None:
            history = (old.root.name, *history)
        history = tuple(d for d in history if d != final.name)[: self.config.keep_packs - 1]
        self._write_state(InstallState(final.name, history))
        self._prune(final.name, history)
        if rollback_to is not None:
            return self._outcome(
                "rolled_back",
                f"rolled back to {self._label(pack)} (fetched from {source})",
                trigger,
                health=health,
            )
        return self._outcome(
            "installed", f"now serving {self._label(pack)}", trigger, health=health
        )

    # --- steps ---------------------------------------------------------------------------------

    def _verify(self, root: Path) -> Pack:
        return load_pack(root, self.config.trust, check_model=False)

    def _load_predictor(self, pack: Pack) -> Predictor:
        return Predictor.from_pack(pack, self.options)

    def _health_check(self, pack: Pack, predictor: Predictor) -> dict[str, Any]:
        """Golden samples within tolerance, and the median of a few runs within the budget."""
        samples = pack.samples
        if samples is None or not samples.inputs:
            return {"golden": "none in pack"}
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            try:
                outputs = predictor.run(samples.inputs)
            except EdgebentoError as exc:
                raise HealthCheckError(f"health check failed: golden inputs fail: {exc}") from exc
            timings.append((time.perf_counter() - start) * 1000)
        for name, expected in samples.outputs.items():
            got = outputs.get(name)
            if got is None or got.shape != expected.shape:
                raise HealthCheckError(f"health check failed: output {name!r} has the wrong shape")
            if not np.allclose(
                got, expected, rtol=self.config.golden_rtol, atol=self.config.golden_atol
            ):
                worst = float(np.max(np.abs(got.astype(np.float64) - expected)))
                raise HealthCheckError(
                    f"health check failed: output {name!r} differs from the golden samples "
                    f"by up to {worst:.3g}"
                )
        median = sorted(timings)[len(timings) // 2]
        budget = self.config.limits.latency_budget_ms
        if median > budget:
            raise HealthCheckError(
                f"health check failed: {median:.1f} ms per golden batch is over the {budget} ms budget"
            )
        return {
            "golden": "ok",
            "samples": len(next(iter(samples.inputs.values()))),
            "median_ms": round(median, 3),
        }

    def _go_live(self, pack: Pack, predictor: Predictor) -> None:
        self.inference.swap(predictor)
        self.current = pack

    def _prune(self, live: str, history: tuple[str, ...]) -> None:
        keep = {live, *history[: self.config.keep_packs - 1]}
        for path in self.packs_dir.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _label(pack: Pack | None) -> str:
        return "nothing" if pack is None else f"{pack.manifest.name} v{pack.manifest.version}"

    def _outcome(self, outcome: str, message: str, trigger: str, **extra: Any) -> dict[str, Any]:
        result = {
            "event": "update",
            "outcome": outcome,
            "message": message,
            "trigger": trigger,
            "model": None if self.current is None else self.current.manifest.model_ref,
            "ts": time.time(),
            **extra,
        }
        self.last_update = result
        self.report(result)
        return result
