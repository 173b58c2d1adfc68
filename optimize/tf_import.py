"""TensorFlow imported the one way the build needs it: tf-keras chosen as ``tf.keras`` before the
first import, and TensorFlow's native start-up lines kept off the terminal. Both Keras paths
(``optimize.convert`` for tf-keras, ``optimize.keras3``) import it from here."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def import_tensorflow() -> Any:
    # tfmot works with Keras 2 only: tf-keras, chosen before TensorFlow is first imported.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with native_stderr_held():
        import tensorflow as tf
    return tf


@contextmanager
def native_stderr_held() -> Iterator[None]:
    """TensorFlow 2.21 logs start-up lines (oneDNN, CUDA drivers, absl) from C++ straight to file
    descriptor 2 before its log level applies (tensorflow/tensorflow#100442), so only the
    descriptor can be redirected; what was held is shown after all if the import fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
