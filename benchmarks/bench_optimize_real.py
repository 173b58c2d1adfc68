"""Public ONNX models that PyPI packages ship, with inputs made like their users make them.

- Silero VAD 16k (``silero-vad``): ``input [batch, 512]`` audio, LSTM ``state [2, batch, 128]``
  (batch on axis 1) and a scalar ``sr``: the recurrent model whose rows are not all on axis 0;
  both v5 exports the wheel ships (``silero_vad.onnx`` names no dim: its axes are proven).
- PP-OCR det and cls (``rapidocr-onnxruntime``): real CNNs (MobileNetV3 with SE blocks,
  HardSigmoid, Resize, ConvTranspose), fed rendered text images normalized as RapidOCR does.

Runs: each model's search runs once (150 s budget; its pick is one run, and says so), then FP32
and the pick are timed side by side in ``EDGEBENTO_BENCH_RUNS`` rounds (3 by default, the order
rotated between rounds): each speed x FP32 is the rounds' median with its range.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.figure import num
from benchmarks.runs import rounds


def silero_vad() -> Path:
    import silero_vad

    return Path(silero_vad.__file__).parent / "data" / "silero_vad_16k_op15.onnx"


def ppocr(name: str) -> Path:
    import rapidocr_onnxruntime

    files = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
    return Path(rapidocr_onnxruntime.__file__).parent / "models" / files[name]


def vad_feeds(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """512-sample chunks of voiced-like signal (harmonics + noise), a warm state, sr=16000."""
    rng = np.random.default_rng(seed)
    t = np.arange(512) / 16000
    f0 = rng.uniform(90, 300, (rows, 1))
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    audio = rng.uniform(0, 0.5, (rows, 1)) * voiced + 0.02 * rng.standard_normal((rows, 512))
    state = 0.1 * rng.standard_normal((2, rows, 128))
    return {
        "input": audio.astype(np.float32),
        "state": state.astype(np.float32),
        "sr": np.array(16000, np.int64),
    }


def _text_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    import cv2

    image = np.full((height, width, 3), 255, np.uint8)
    for _ in range(max(1, height // 24)):
        words = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "), 12))
        y = int(rng.integers(16, max(17, height - 4)))
        scale = float(rng.uniform(0.4, 0.9))
        cv2.putText(image, words, (2, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1)
    return image


def ocr_feeds(name: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """det: 64x64 pages; cls: 48x192 text lines, some upside down; normalized as RapidOCR."""
    rng = np.random.default_rng(seed)
    height, width = (64, 64) if name == "det" else (48, 192)
    images = []
    for i in range(rows):
        image = _text_image(rng, height, width).astype(np.float32) / 255
        if name == "cls" and i % 2:
            image = image[::-1, ::-1]  # what the classifier is there to spot
        images.append((image - 0.5) / 0.5)
    return {"x": np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)}


WORK = Path("build/bench/real")


def _one(name: str, source: Path, calibration: dict, evaluation: dict) -> dict[str, Any]:
    from benchmarks.optimize_common import candidate_rows, optimize_on, side_by_side
    from modelpack.iosig import read_io_signature
    from optimize.data import Dataset, batch_axes

    work = WORK / name
    started = time.monotonic()
    result = optimize_on(
        source,
        work,
        name,
        calibration,
        evaluation,
        latency_seconds=10,
        progress=False,
        time_budget=150,  # per model; what was not tried is listed as such
    )
    to_pick = time.monotonic() - started
    inputs, _ = read_io_signature(source)
    data = Dataset(evaluation, None, batch_axes(inputs, evaluation))
    table = side_by_side(
        {"fp32": source, "edgebento": work / "pack" / "model.onnx"},
        data,
        64,
        None,
        15,
        rounds=rounds(),
    )
    chosen = next(r for r in result.rows if r["chosen"])
    quantized = result.chosen.name != "fp32"
    fidelity = chosen["fidelity"]["decisive_value"]
    return {
        "chosen": result.chosen.name,
        "reason": result.reason,
        "decided_by": chosen["fidelity"]["decided_by"],
        "fidelity": fidelity,
        "seconds_to_pick": round(to_pick, 1),  # one search: one run
        "ok": (not quantized) or fidelity >= 0.99,
        "side_by_side": table,
        "candidates": candidate_rows(result),
    }


def run(results_dir: Path) -> dict[str, Any]:
    found = {
        "silero_vad": _one("silero_vad", silero_vad(), vad_feeds(128, 0), vad_feeds(64, 1)),
        # The export with the If node on sr and no dim named: batch axes proven by running.
        "silero_vad_if": _one(
            "silero_vad_if",
            silero_vad().with_name("silero_vad.onnx"),
            vad_feeds(128, 0),
            vad_feeds(64, 1),
        ),
        "ppocr_cls": _one(
            "ppocr_cls", ppocr("cls"), ocr_feeds("cls", 96, 0), ocr_feeds("cls", 64, 1)
        ),
        "ppocr_det": _one(
            "ppocr_det", ppocr("det"), ocr_feeds("det", 64, 0), ocr_feeds("det", 32, 1)
        ),
    }
    return {
        "headline": "; ".join(
            f"{k}: {v['chosen']} ({num(v['side_by_side']['edgebento']['speedup'], '.3f', 'x')}, "
            f"{num(v['side_by_side']['edgebento'].get('speedup_by_cpu'), '.3f', 'x')} by CPU, "
            f"{v['decided_by']} {v['fidelity']:.4f})"
            for k, v in found.items()
        )
        + f"; search 1 run a model, speed x FP32 median of {rounds()} rounds",
        "runs_note": f"search 1, timing median of {rounds()}",
        "targets_met": all(v["ok"] for v in found.values()),
        "models": found,
    }
