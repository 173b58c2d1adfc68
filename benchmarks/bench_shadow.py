"""Shadow rollouts (issue 21 item 4), side by side in one run: the agent's hot path (its own
``InferenceService`` answering MQTT-shaped one-row requests in process) with no shadow, with a
shadow model running at the default sampling rate (5 runs a second) and at ten times that.

The figure is the process's CPU per answered request (``time.process_time``: the shadow thread's
runs included, as a device pays them), in interleaved rounds so that load on a shared machine
moves every side alike; target: under 5 % lost at the default rate. The shadow runs done and the
samples dropped because the infer queue was busy are counted, so a side that ran no shadow
cannot pass for a cheap one."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cloud_sync.shadow_figures import ShadowSettings

ROUNDS, SECONDS_PER_ROUND = 9, 1.0
TARGET_LOSS = 0.05


def _packs(work: Path) -> tuple[Any, Any]:
    from modelpack import Samples, create_pack
    from modelpack.loader import load_pack
    from tests.support import models
    from tests.support.shadow_models import flipping_mlp

    live, new = models.mlp(work / "live.onnx"), flipping_mlp(work / "new.onnx")
    packs = []
    for version, model in ((1, live), (2, new)):
        root = work / f"v{version}"
        samples = Samples(*models.golden_samples(model))
        create_pack(model, root, name="tiny", version=version, samples=samples)
        packs.append(load_pack(root, trusted=(), allow_unsigned=True))
    return packs[0], packs[1]


def run(results_dir: Path) -> dict[str, Any]:
    from edge_agent.inference import InferenceService
    from edge_agent.shadow import ShadowRunner
    from modelpack.predictor import Predictor

    rate = ShadowSettings().rate
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        work = Path(tmp)
        live, new = _packs(work)
        service = InferenceService()
        service.swap(Predictor.from_pack(live))
        stand_in = SimpleNamespace(config=SimpleNamespace(data_dir=work))  # no install here
        runners = {}
        for side, side_rate in (("default", rate), ("tenfold", rate * 10)):
            runner = ShadowRunner(stand_in, service, lambda *_: None, lambda: None)  # type: ignore[arg-type]
            runner.run_beside(new, Predictor.from_pack(new), work / "v2", side_rate, 3600)
            runners[side] = runner
        rng = np.random.default_rng(1)  # inputs of which about a tenth the new version flips
        docs = [{"inputs": {"x": rng.standard_normal((1, 8)).tolist()}} for _ in range(50)]
        cpu_us: dict[str, list[float]] = {"off": [], "default": [], "tenfold": []}
        requests: dict[str, int] = dict.fromkeys(cpu_us, 0)
        for doc in docs:
            service.run(doc)  # warm up
        for i in range(ROUNDS):
            sides = list(cpu_us)
            for side in sides[i % 3 :] + sides[: i % 3]:
                service.core.shadow = runners.get(side)  # type: ignore[attr-defined]
                n, cpu, until = 0, time.process_time(), time.monotonic() + SECONDS_PER_ROUND
                while time.monotonic() < until:
                    for doc in docs:
                        service.run(doc)
                    n += 50
                service.core.shadow = None  # type: ignore[attr-defined]
                time.sleep(0.05)  # the last sample's shadow run is counted in this round
                cpu_us[side].append((time.process_time() - cpu) / n * 1e6)
                requests[side] += n
        shadows = {side: runner.figures for side, runner in runners.items()}
        for runner in runners.values():
            runner.stop("benchmark over")
    off = statistics.median(cpu_us["off"])
    sides = {}
    for side in ("default", "tenfold"):
        on, figures = statistics.median(cpu_us[side]), shadows[side]
        assert figures is not None and figures.samples > 0, f"the {side} shadow never ran"
        sides[side] = {
            "shadow_runs_per_s": rate if side == "default" else rate * 10,
            "cpu_us_per_request": round(on, 1),
            "loss": round(1 - off / on, 4),
            "requests": requests[side],
            "shadow_runs": figures.samples,
            "dropped_busy": figures.busy,
            "top1_agreement": round(figures.agreement or 0.0, 4),
        }
    loss = sides["default"]["loss"]
    return {
        "headline": (
            f"agent hot path with a shadow at {rate:g} runs/s: {loss:.1%} of its CPU per request "
            f"({sides['default']['cpu_us_per_request']} vs {off:.1f} µs, shadow thread included); "
            f"at {rate * 10:g} runs/s {sides['tenfold']['loss']:.1%}"
        ),
        "targets_met": loss < TARGET_LOSS,
        "targets": {"hot_path_loss_at_default_rate": f"< {TARGET_LOSS:.0%}"},
        "rows_per_request": 1,
        "cpu_us_per_request_off": round(off, 1),
        "requests_off": requests["off"],
        "with_shadow": sides,
    }
