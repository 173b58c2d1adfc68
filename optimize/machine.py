"""The CPU a search measured on: its latencies hold for that CPU's instruction set only.

int8 speed depends on a few instruction-set extensions: VNNI (AVX-512 or AVX) turns an int8
product into one instruction, AMX multiplies int8 tiles, and without them U8S8 products can
saturate (hence ``reduce_range``). Every report records them beside its figures.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

# The flags that move int8 and float kernels in ONNX Runtime (x86 /proc/cpuinfo names, and the
# Arm "Features" names: asimddp is the dot product, i8mm the int8 matrix multiply).
FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "bf16",
)
_MODEL = re.compile(r"^(?:model name|Hardware|Processor)\s*:\s*(.+)$", re.MULTILINE)
_FLAGS = re.compile(r"^(?:flags|Features)\s*:\s*(.+)$", re.MULTILINE)


def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model, logical cores, the relevant flags and ONNX Runtime's version."""
    import onnxruntime

    cpu, flags = platform.processor() or platform.machine() or "unknown CPU", set[str]()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:  # not Linux: the model name from platform, no flags
        text = ""
    if found := _MODEL.search(text):
        cpu = found.group(1).strip()
    if found := _FLAGS.search(text):
        flags = set(found.group(1).split())
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "flags": [f for f in FLAGS if f in flags],
        "onnxruntime": onnxruntime.__version__,
    }


# What lets ONNX Runtime's x86 int8 kernels sum products of 8-bit weights without saturating.
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")


def u8s8_saturates(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on an x86 CPU without VNNI or AMX. There ONNX Runtime multiplies uint8 activations
    by int8 weights with ``vpmaddubsw``, which adds pairs of products in 16 bits and saturates
    for weights that use all 8 bits: smoothing (``optimize.smooth``) moves activation outliers
    into the weights and so makes them wide. On an AMD EPYC with AVX2 alone, tiny BERT's
    smoothed dynamic int8 kept a pooled cosine of 0.919 with 8-bit weights and 0.997 with 7-bit
    (``reduce_range``); on AVX-512 VNNI the 8-bit weights kept the budget."""
    found = describe(cpuinfo)
    if found["arch"] not in ("x86_64", "AMD64", "i686", "x86"):
        return False
    flags = set(found["flags"])
    return "avx2" in flags and not flags & set(INT8_DOT)
