"""Pruning Keras models with fine-tuning: structured (fewer Dense units) and tfmot sparsity.

tfmot's magnitude pruning leaves zeros that compress (gzip) but give ONNX Runtime no speed, so
the report says so. Speed comes from removing units: for a Sequential stack of Dense layers the
least important hidden units (mean absolute activation times outgoing weight norm) are cut, the
smaller model is fine-tuned on ``--train-data``, and tfmot sparsity is applied on top.

A Keras 3 model is cut and fine-tuned with Keras 3 itself; tfmot works on tf-keras models only,
so for its sparsity a Keras 3 Sequential model is rebuilt under tf-keras (checked to answer the
same), and any other Keras 3 model skips that candidate with one note saying so.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from optimize.convert import import_tensorflow, keras_to_onnx, load_keras
from optimize.data import Dataset
from optimize.passes import PassConfig

PASSTHROUGH = ("Dropout", "Activation")


class KerasPruneConfig(PassConfig):
    sparsity: float = 0.8  # tfmot magnitude sparsity; 0 = none
    units_ratio: float = 0.0  # share of hidden Dense units to remove; 0 = none
    epochs: int = 3  # fine-tuning under the sparsity schedule
    finetune_epochs: int = 30  # fine-tuning after units were cut: the model must re-learn
    batch_size: int = 32
    learning_rate: float = 1e-3


def _api(model: Any) -> Any:
    """The Keras that built ``model``: ``keras`` (Keras 3) or tf-keras (``tf.keras`` here)."""
    from optimize import keras3

    return keras3.import_keras3() if keras3.is_keras3(model) else import_tensorflow().keras


def _loss(model: Any, labels: np.ndarray) -> Any:
    keras = _api(model)
    last = model.layers[-1]
    # Under tfmot the last layer is a PruneLowMagnitude wrapper: its activation is the inner one's.
    activation = getattr(getattr(last, "layer", last), "activation", None)
    from_logits = getattr(activation, "__name__", "") != "softmax"
    if labels.ndim == 1 or labels.shape[-1] == 1:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.CategoricalCrossentropy(from_logits=from_logits)


def _inputs(model: Any, train: Dataset) -> Any:
    arrays = [train.inputs[t.name.split(":")[0]] for t in model.inputs]
    return arrays if len(arrays) > 1 else arrays[0]


def _fit(
    model: Any, train: Dataset, config: KerasPruneConfig, epochs: int, callbacks: list[Any]
) -> None:
    keras = _api(model)
    assert train.labels is not None  # prune_keras refuses training data without labels
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate), loss=_loss(model, train.labels)
    )
    model.fit(
        _inputs(model, train),
        train.labels,
        epochs=epochs,
        batch_size=config.batch_size,
        verbose=0,
        callbacks=callbacks,
    )


def shrink_dense(model: Any, ratio: float, train: Dataset) -> Any:
    """A Sequential Dense stack with ``ratio`` of every hidden layer's units removed."""
    keras = _api(model)
    layers = list(model.layers)
    kinds = [type(layer).__name__ for layer in layers]
    if not isinstance(model, keras.Sequential) or any(
        k != "Dense" and k not in PASSTHROUGH for k in kinds
    ):
        raise ValueError("structured Keras pruning handles Sequential stacks of Dense layers")
    dense = [i for i, k in enumerate(kinds) if k == "Dense"]
    probe = keras.Model(model.inputs, [layers[i].output for i in dense[:-1]])
    acts = probe.predict(_inputs(model, train)[:512], verbose=0)
    acts = acts if isinstance(acts, list) else [acts]
    keep: dict[int, np.ndarray] = {}
    mean_act: dict[int, np.ndarray] = {}
    for (i, nxt), act in zip(itertools.pairwise(dense), acts, strict=True):
        units = layers[i].units
        n = max(1, math.ceil(units * (1 - ratio) / 8) * 8)
        outgoing = np.linalg.norm(layers[nxt].get_weights()[0], axis=1)
        importance = np.abs(act).mean(axis=0) * outgoing
        keep[i] = np.sort(np.argsort(importance)[::-1][: min(n, units)])
        mean_act[i] = act.mean(axis=0)
    clone = keras.Sequential(
        [keras.layers.Input(model.input_shape[1:], name=model.inputs[0].name.split(":")[0])]
    )
    previous: np.ndarray | None = None
    dense_before = dict(zip(dense[1:], dense, strict=False))
    for i, layer in enumerate(layers):
        config = layer.get_config()
        if i not in dense:
            clone.add(type(layer).from_config(config))
            continue
        kernel, *bias = layer.get_weights()
        if previous is not None:
            # What the cut units gave on average moves into this layer's bias.
            drop = np.setdiff1d(np.arange(kernel.shape[0]), previous)
            if bias:
                bias[0] = bias[0] + mean_act[dense_before[i]][drop] @ kernel[drop]
            kernel = kernel[previous]
        if i in keep:
            kernel, bias = kernel[:, keep[i]], [b[keep[i]] for b in bias]
            config["units"] = len(keep[i])
            previous = keep[i]
        else:
            previous = None
        new = type(layer).from_config(config)
        clone.add(new)
        new.set_weights([kernel, *bias])
    return clone


def prune_keras(
    source: Path,
    dst: Path,
    config: KerasPruneConfig,
    train: Dataset,
    trust_model_code: bool = False,
) -> None:
    """Cut units (and fine-tune), then sparsify with tfmot (and fine-tune), then write ONNX."""
    import_tensorflow()  # before tfmot imports it: tf-keras, and no start-up noise
    import tensorflow_model_optimization as tfmot

    from optimize import keras3

    if train.labels is None:
        raise ValueError("Keras pruning fine-tunes the model: --train-data needs 'labels'")
    model = load_keras(source, trust_model_code)
    if config.sparsity > 0 and keras3.is_keras3(model):
        model = keras3.to_tf_keras(model, _inputs(model, train)[:256])
    if config.units_ratio > 0:
        model = shrink_dense(model, config.units_ratio, train)
        _fit(model, train, config, config.finetune_epochs, [])
    if config.sparsity > 0:
        steps = max(1, math.ceil(train.rows / config.batch_size)) * config.epochs
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0,
            final_sparsity=config.sparsity,
            begin_step=0,
            end_step=max(1, steps // 2),
            frequency=max(1, steps // 20),  # the default (100 steps) never fires on small data
        )
        pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
        _fit(pruned, train, config, config.epochs, [tfmot.sparsity.keras.UpdatePruningStep()])
        model = tfmot.sparsity.keras.strip_pruning(pruned)
    keras_to_onnx(model, dst)
