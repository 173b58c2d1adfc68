"""Keras 3 models (``import keras``; what most Keras users write today) loaded and exported.

TensorFlow's own ``tf.keras`` is tf-keras here (tfmot needs Keras 2), but the ``keras`` package
installed beside it, as TensorFlow's dependency, is Keras 3, and a file it saved does not load in
tf-keras. So a Keras 3 file is built by Keras 3, after the same checks as any zip ``.keras`` file
(``optimize.keras_config``), and exported to ONNX by tf2onnx from a ``tf.function`` of the model:
the path Keras 3's own ``model.export(format="onnx")`` takes, without its need for a model that
was called once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError
from optimize.tf_import import import_tensorflow, native_stderr_held


def import_keras3() -> Any:
    """The ``keras`` package, checked to be Keras 3; TensorFlow imported first, quietly."""
    import_tensorflow()
    try:
        with native_stderr_held():
            import keras
    except ImportError as exc:
        raise ConfigError(
            "this model was saved by Keras 3, which is not installed: pip install 'keras>=3'"
        ) from exc
    if not keras.__version__.startswith("3."):
        raise ConfigError(
            f"this model was saved by Keras 3, but the installed keras is {keras.__version__}:"
            " pip install 'keras>=3'"
        )
    return keras


def is_keras3(model: Any) -> bool:
    """A Keras 3 object: its class lives in ``keras``, not in ``tf_keras``."""
    return type(model).__module__.split(".")[0] == "keras"


def load(path: Path, trust_model_code: bool) -> Any:
    keras = import_keras3()
    return keras.saving.load_model(str(path), compile=False, safe_mode=not trust_model_code)


def _output_names(model: Any, count: int) -> list[str]:
    names = getattr(model, "output_names", None) or [model.layers[-1].name]
    names = [str(n) for n in names]
    if len(names) != count or len(set(names)) != count:
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    return names


def _rename_outputs(proto: Any, names: list[str]) -> None:
    """tf2onnx names a function's outputs ``Identity:0``: give them the model's output names."""
    renames = {out.name: new for out, new in zip(proto.graph.output, names, strict=True)}
    taken = {v.name for v in proto.graph.input} | {i.name for i in proto.graph.initializer}
    renames = {old: new for old, new in renames.items() if new not in taken}
    for node in proto.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.input[:] = [renames.get(i, i) for i in node.input]
    for out in proto.graph.output:
        out.name = renames.get(out.name, out.name)


def to_onnx(model: Any, dst: Path, opset: int) -> None:
    """Export a Keras 3 model to ONNX through a ``tf.function`` with the inputs' own names."""
    tf = import_tensorflow()
    import tf2onnx

    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]

    @tf.function(input_signature=specs)  # type: ignore[misc]
    def forward(*args: Any) -> Any:
        return model(args[0] if len(args) == 1 else list(args), training=False)

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=specs, opset=opset)
    _rename_outputs(proto, _output_names(model, len(proto.graph.output)))
    dst.write_bytes(proto.SerializeToString())


# Config keys that hold objects (initializers, regularizers, constraints): the weights are set
# from the Keras 3 model right after, so tf-keras' defaults do; Keras 3 writes them in shapes
# tf-keras does not take (``input_axes`` on initializers, dtype policies as objects).
_OBJECT_KEYS = ("_initializer", "_regularizer", "_constraint", "dtype")


def to_tf_keras(model: Any, probe: Any) -> Any:
    """A Keras 3 ``Sequential`` model rebuilt layer by layer under tf-keras, weights and all,
    for tfmot; refused unless the rebuilt model answers ``probe`` as the original does."""
    import inspect

    import numpy as np

    keras = import_keras3()
    tf = import_tensorflow()
    if not isinstance(model, keras.Sequential) or len(model.inputs) != 1:
        raise NotImplementedError(
            "tfmot works on tf-keras models only; a Keras 3 model is rebuilt under tf-keras for"
            " it only when it is Sequential, and this one is not: the other candidates go on"
        )
    name = model.inputs[0].name.split(":")[0]
    clone = tf.keras.Sequential([tf.keras.layers.Input(model.input_shape[1:], name=name)])
    for layer in model.layers:
        kind = getattr(tf.keras.layers, type(layer).__name__)
        takes = set(inspect.signature(kind.__init__).parameters) | {"name", "trainable"}
        config = {
            k: v
            for k, v in layer.get_config().items()
            if k in takes and not k.endswith(_OBJECT_KEYS)
        }
        rebuilt = kind.from_config(config)
        clone.add(rebuilt)
        rebuilt.set_weights(layer.get_weights())
    want = model.predict(probe, verbose=0)
    got = clone.predict(probe, verbose=0)
    if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise NotImplementedError(
            "tfmot works on tf-keras models only, and this Keras 3 model rebuilt under tf-keras"
            " answers differently: the other candidates go on"
        )
    return clone
