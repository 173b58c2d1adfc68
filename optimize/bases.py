"""The models the search starts from (FP32, pruned, fused) and the candidates it plans on them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimize.data import Dataset
from optimize.fusion import FuseConfig, bert_like, fuse
from optimize.keras_prune import KerasPruneConfig, prune_keras
from optimize.load import NormalizeConfig, normalize
from optimize.passes import PassFailed, Runner
from optimize.pick import BASELINE
from optimize.prune import PruneConfig, prune_with
from optimize.quantize import QuantizeConfig, search_space
from optimize.search import hash_data

AUTO_PRUNE_RATIOS = (0.5, 0.75)


def starting_models(
    runner: Runner,
    source: Path,
    kind: str,
    base: Path,
    options: Any,
    calibration: Dataset,
    train: Dataset | None,
    notes: list[str],
) -> dict[str, Path]:
    """FP32 plus every pruned model to quantize further."""
    bases = {BASELINE: base}
    if options.prune == "off":
        return bases
    ratios = AUTO_PRUNE_RATIOS if options.prune == "auto" else (float(options.prune),)
    if kind == "keras" and train is not None:
        keras_configs = {"keras-sparse-80%": KerasPruneConfig()} | {
            # Cut units are re-learned by fine-tuning; sparsity on top of that cost accuracy
            # on digits (1.7 points at 50% units), so the two are separate candidates.
            f"keras-prune-{r:.0%}": KerasPruneConfig(units_ratio=r, sparsity=0.0)
            for r in ratios
        }
        for label, config in keras_configs.items():
            try:
                pruned = runner.run(
                    "keras-prune",
                    lambda s, d, c: prune_keras(source, d, c, train, options.trust_model_code),
                    base,
                    config,
                    data_key=hash_data(train),
                )
                bases[label] = runner.run("normalize", normalize, pruned, NormalizeConfig())
            except PassFailed as exc:
                notes.append(f"{label} failed: {exc.reason}")
        notes.append("tfmot sparsity gives compression (gzip) only: ONNX Runtime skips no zeros")
        return bases  # fine-tuned unit pruning beats cutting units from the ONNX graph blind
    if kind == "keras":
        notes.append("Keras pruning skipped: it fine-tunes, so it needs --train-data")
    for parent, model in list(bases.items()):
        prefix = "" if parent == BASELINE else f"{parent} + "
        for ratio in ratios:
            try:
                bases[f"{prefix}prune-{ratio:.0%}"] = runner.run(
                    "prune",
                    prune_with(calibration),
                    model,
                    PruneConfig(ratio=ratio),
                    data_key=hash_data(calibration),
                )
            except PassFailed as exc:
                notes.append(f"structured pruning at {ratio:.0%} not applied: {exc.reason}")
                break
    return bases


def plan(
    bases: dict[str, Path], options: Any, op_types: set[str]
) -> list[tuple[str, Path, QuantizeConfig | None]]:
    """What to build, most promising first: each base's quantized variants in the order
    ``search_space`` gives (static first for convolutions); pruned bases get the two most
    telling variants, and a static one (rows that stay independent) if those are dynamic."""
    found: list[tuple[str, Path, QuantizeConfig | None]] = []
    for base_name, path in bases.items():
        if base_name != BASELINE:
            found.append((base_name, path, None))
        space = search_space(options.quantize, True, op_types)
        if base_name.startswith(("prune", "keras")) or " + prune" in base_name:
            telling = [c for c in space if c.per_channel and not c.reduce_range]
            static = [c for c in telling if c.mode == "static"][:1]
            space = telling[:2] + [c for c in static if c not in telling[:2]]
        found += [(base_name, path, config) for config in space]
    return found


def fused_model(runner: Runner, base: Path, inputs: Sequence[Any], notes: list[str]) -> Path | None:
    """The transformer-fused model, for BERT-like graphs; None for the others."""
    if not bert_like(op_types(base), {s.name for s in inputs}):
        return None
    try:
        return runner.run("fuse", fuse, base, FuseConfig())
    except PassFailed as exc:
        notes.append(f"transformer fusion not applied: {exc.reason}")
        return None


def op_types(model: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}
