"""The demo's model: a small Keras MLP trained on scikit-learn's digits (shipped with sklearn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_splits(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write train, calibration and evaluation ``.npz`` files (``x`` and ``labels``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut1, cut2 = int(len(x) * 0.6), int(len(x) * 0.8)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, (lo, hi) in {
        "train": (0, cut1),
        "calib": (cut1, cut2),
        "eval": (cut2, len(x)),
    }.items():
        paths[split] = out / f"digits-{split}.npz"
        np.savez(paths[split], x=x[lo:hi], labels=y[lo:hi])
    return paths


def train_keras_mlp(train: Path, out: Path, epochs: int = 30) -> Path:
    """Train 64 -> 256 -> 128 -> 10 on the train split and save it as ``.keras``."""
    from optimize.convert import import_tensorflow

    import_tensorflow()  # tf-keras, and TensorFlow's start-up lines kept off the terminal
    import tf_keras as keras

    data = np.load(train)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.layers.InputLayer(input_shape=(64,), name="x"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data["x"], data["labels"], epochs=epochs, batch_size=64, verbose=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return out
