"""The Keras objects a model file may name by default, each with the config keys it may carry.

Only classes that hold tensor maths are here: building one runs no code the file chose, and its
config is numbers, names and other objects of this table. The keys are the union of what
tf-keras 2.21 and Keras 3.15 write (``get_config``); a key outside them is refused, since a new
key is a new way for a file to steer what Keras builds. Anything else (``Lambda``,
``TensorFlowOpLayer``, custom layers, preprocessing that reads files) needs ``--trust-model-code``.
"""

from __future__ import annotations

# Keys every layer has; ``batch_input_shape`` is what tf-keras writes for ``input_shape=``.
_BASE = frozenset({"name", "trainable", "dtype", "batch_input_shape"})
_BIAS = frozenset(
    {"use_bias", "bias_initializer", "bias_regularizer", "bias_constraint", "activation"}
    | {"activity_regularizer"}
)
_KERNEL = frozenset({"kernel_initializer", "kernel_regularizer", "kernel_constraint"})
_CONV = (
    _BASE
    | _BIAS
    | _KERNEL
    | {"filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "groups"}
)
_DEPTHWISE = frozenset(
    {"depth_multiplier", "depthwise_initializer", "depthwise_regularizer", "depthwise_constraint"}
)
_POINTWISE = frozenset({"pointwise_initializer", "pointwise_regularizer", "pointwise_constraint"})
_POOL = _BASE | {"pool_size", "strides", "padding", "data_format"}
_GLOBAL_POOL = _BASE | {"data_format", "keepdims"}
_AFFINE = frozenset(
    {"axis", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer"}
    | {"beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint"}
)
_DROPOUT = _BASE | {"rate", "noise_shape", "seed", "data_format"}
_RESHAPING = _BASE | {"data_format"}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _each(names: str, keys: frozenset[str]) -> dict[str, frozenset[str]]:
    return dict.fromkeys(names.split(), keys)


LAYERS: dict[str, frozenset[str]] = {
    "InputLayer": frozenset(
        {"batch_input_shape", "batch_shape", "input_shape", "dtype", "name", "sparse", "ragged"}
        | {"optional"}
    ),
    "Dense": _BASE | _BIAS | _KERNEL | {"units", "quantization_config", "lora_rank"},
    "Activation": _BASE | {"activation"},
    **_each("Dropout SpatialDropout1D SpatialDropout2D SpatialDropout3D", _DROPOUT),
    "Flatten": _RESHAPING,
    "Reshape": _BASE | {"target_shape"},
    "Permute": _BASE | {"dims"},
    "RepeatVector": _BASE | {"n"},
    "Identity": _BASE,
    **_each("Conv1D Conv2D Conv3D", _CONV),
    **_each("Conv1DTranspose Conv2DTranspose Conv3DTranspose", _CONV | {"output_padding"}),
    **_each("DepthwiseConv1D DepthwiseConv2D", (_CONV - _KERNEL - {"filters"}) | _DEPTHWISE),
    **_each("SeparableConv1D SeparableConv2D", _CONV | _DEPTHWISE | _POINTWISE),
    **_each(
        "MaxPooling1D MaxPooling2D MaxPooling3D AveragePooling1D AveragePooling2D AveragePooling3D",
        _POOL,
    ),
    **_each(
        "GlobalMaxPooling1D GlobalMaxPooling2D GlobalMaxPooling3D GlobalAveragePooling1D"
        " GlobalAveragePooling2D GlobalAveragePooling3D",
        _GLOBAL_POOL,
    ),
    "BatchNormalization": _BASE
    | _AFFINE
    | {"momentum", "moving_mean_initializer", "moving_variance_initializer", "synchronized"}
    | {"renorm", "renorm_clipping", "renorm_momentum"},
    "LayerNormalization": _BASE | _AFFINE | {"rms_scaling"},
    "GroupNormalization": _BASE | _AFFINE | {"groups"},
    "UnitNormalization": _BASE | {"axis"},
    "ReLU": _BASE | {"max_value", "negative_slope", "threshold"},
    "LeakyReLU": _BASE | {"alpha", "negative_slope"},
    "PReLU": _BASE | {"alpha_initializer", "alpha_regularizer", "alpha_constraint", "shared_axes"},
    "ELU": _BASE | {"alpha"},
    "Softmax": _BASE | {"axis"},
    **_each("ZeroPadding1D ZeroPadding2D ZeroPadding3D", _RESHAPING | {"padding"}),
    **_each("Cropping1D Cropping2D Cropping3D", _RESHAPING | {"cropping"}),
    **_each("UpSampling1D UpSampling2D UpSampling3D", _RESHAPING | {"size", "interpolation"}),
    **_each("Add Subtract Multiply Average Maximum Minimum", _BASE),
    "Concatenate": _BASE | {"axis"},
    "Dot": _BASE | {"axes", "normalize"},
    "Embedding": _BASE
    | {"input_dim", "output_dim", "input_length", "mask_zero", "activity_regularizer"}
    | {"embeddings_initializer", "embeddings_regularizer", "embeddings_constraint"}
    | {"quantization_config", "lora_rank"},
    "Rescaling": _BASE | {"scale", "offset"},
    # tf-keras saves ``x + 1.0`` in a functional model as an op layer; only TF_FUNCTIONS below.
    "TFOpLambda": _BASE | {"function"},
    "SlicingOpLambda": _BASE | {"function"},
}

MODELS: dict[str, frozenset[str]] = {
    "Sequential": frozenset({"name", "trainable", "dtype", "layers", "build_input_shape"}),
    "Functional": frozenset(
        {"name", "trainable", "dtype", "layers", "input_layers", "output_layers"}
    ),
}

_SEED = frozenset({"seed"})
_FAN = frozenset({"seed", "input_axes", "output_axes"})
INITIALIZERS: dict[str, frozenset[str]] = {
    **_each("Zeros Ones", frozenset()),
    "Constant": frozenset({"value"}),
    **_each("RandomNormal TruncatedNormal", _SEED | {"mean", "stddev"}),
    "RandomUniform": _SEED | {"minval", "maxval"},
    "VarianceScaling": _FAN | {"scale", "mode", "distribution"},
    "Orthogonal": _SEED | {"gain"},
    **_each("GlorotNormal GlorotUniform HeNormal HeUniform LecunNormal LecunUniform", _FAN),
}
REGULARIZERS: dict[str, frozenset[str]] = {
    "L1": frozenset({"l1"}),
    "L2": frozenset({"l2"}),
    "L1L2": frozenset({"l1", "l2"}),
}
CONSTRAINTS: dict[str, frozenset[str]] = {
    "MaxNorm": frozenset({"axis", "max_value"}),
    "MinMaxNorm": frozenset({"axis", "max_value", "min_value", "rate"}),
    "NonNeg": frozenset(),
    "UnitNorm": frozenset({"axis"}),
}
# Plumbing of the file format: dtype policies, a graph's tensors (Keras 3), tuples.
PLUMBING: dict[str, frozenset[str]] = {
    **_each("DTypePolicy FloatDTypePolicy Policy", frozenset({"name"})),
    "__keras_tensor__": frozenset({"shape", "dtype", "keras_history"}),
    "__tuple__": frozenset({"value"}),
}

# What a string may name where Keras looks it up by name (``"activation": "relu"``).
ACTIVATIONS = _words(
    "linear relu relu6 leaky_relu elu selu gelu silu swish sigmoid hard_sigmoid hard_silu"
    " hard_swish tanh softmax log_softmax softplus softsign exponential mish celu glu"
    " sparse_plus squareplus tanh_shrink soft_shrink hard_shrink hard_tanh"
)
INITIALIZER_NAMES = _words(
    "zeros ones constant random_normal random_uniform truncated_normal variance_scaling"
    " orthogonal glorot_normal glorot_uniform he_normal he_uniform lecun_normal lecun_uniform"
    " Zeros Ones GlorotUniform GlorotNormal HeNormal HeUniform"
)
REGULARIZER_NAMES = _words("l1 l2 l1_l2 L1 L2 L1L2")
CONSTRAINT_NAMES = _words("max_norm min_max_norm non_neg unit_norm")

# TensorFlow functions an op layer may call: element-wise and shape maths, nothing that touches
# files, runs Python or loads libraries.
TF_FUNCTIONS = (
    _words("__operators__.add __operators__.getitem __operators__.eq __operators__.ne")
    | {
        f"math.{op}"
        for op in _words(
            "add subtract multiply truediv divide negative abs exp log sqrt rsqrt square pow"
            " maximum minimum sigmoid tanh reduce_mean reduce_sum reduce_max reduce_min"
        )
    }
    | {f"nn.{op}" for op in _words("relu relu6 softmax sigmoid gelu silu")}
    | _words("reshape concat transpose expand_dims squeeze stack clip_by_value identity cast")
)

ALL_CLASSES: dict[str, frozenset[str]] = {
    **LAYERS,
    **MODELS,
    **INITIALIZERS,
    **REGULARIZERS,
    **CONSTRAINTS,
    **PLUMBING,
}
