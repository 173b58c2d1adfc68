"""Memory the agent need not hold: a retired model's, and modules nothing in it uses.

A model swap frees the old ONNX Runtime session, but glibc keeps the freed pages in its heap
for reuse: measured here, each swap left about 0.25 MB more resident, and twelve swaps 2.7 MB.
``malloc_trim(0)`` returns the free pages anywhere in the heap, so a device's RSS stays what
one session costs however many updates it takes. Elsewhere than glibc (musl, macOS) it does
nothing.

The libraries the agent runs on import modules for features it never asks of them (2.2 MB
anonymous after load and two swaps, docs/edge-agent.md, "Memory"); ``defer_unused_imports``
leaves each in ``sys.modules`` as a placeholder that imports the real module the first time
anything reads from it.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import logging
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def _trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _trim()


def release_freed_memory() -> bool:
    """Collect cycles, then hand free heap pages back; True when the C library did it."""
    gc.collect()
    if _MALLOC_TRIM is None:
        return False
    try:
        return bool(_MALLOC_TRIM(0))
    except Exception as exc:  # a foreign libc: never let housekeeping fail an install
        log.debug("malloc_trim failed: %s", exc)
        return False


# Imported by libraries the agent uses, for what the agent never asks of them: paho-mqtt imports
# urllib.request (with http.client and email) for a proxy it looks up only when PySocks is
# installed; pydantic's plugin loader imports importlib.metadata (with zipfile, csv and email)
# to scan entry points, which PYDANTIC_DISABLE_PLUGINS turns off, and pydantic.types imports
# secrets for its secret types; numpy imports pickle for ``ndarray.dump``; shutil, zipfile and
# modelpack.archive import gzip, bz2 and lzma for compressed archives. Each name maps to the
# attributes its importers bind at import (``from X import name``): those are forwarded.
UNUSED_IMPORTS: dict[str, tuple[str, ...]] = {
    "urllib.request": (),
    "importlib.metadata": ("entry_points",),
    "secrets": (),
    "pickle": (),
    "gzip": (),
    "bz2": (),
    "lzma": (),
}
_LOADING = threading.Lock()


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module that nothing has used yet: an ``import`` of it
    binds this placeholder, and reading any attribute it lacks imports the real module, which
    then replaces it in ``sys.modules`` and in its package. Not ``importlib.util.LazyLoader``:
    its module loads at ``from X import name``, which pydantic does at import, and on Python
    3.11 two threads touching it first at once can see it half loaded."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(_real(self), attr)


def _real(placeholder: types.ModuleType) -> types.ModuleType:
    name = placeholder.__name__
    with _LOADING:  # the placeholder leaves once; the import system's own lock on ``name``
        if sys.modules.get(name) is placeholder:  # then makes every thread wait for one import
            del sys.modules[name]
    return importlib.import_module(name)


def _forward(placeholder: types.ModuleType, attr: str) -> Callable[..., Any]:
    def forwarded(*args: Any, **kwargs: Any) -> Any:
        return getattr(_real(placeholder), attr)(*args, **kwargs)

    forwarded.__name__ = attr
    return forwarded


def defer_unused_imports() -> None:
    """Put a placeholder for each of ``UNUSED_IMPORTS`` that is not imported yet; call it before
    paho-mqtt and pydantic are imported. Turns pydantic's plugins off unless the environment
    says otherwise (the agent uses none)."""
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    for name, attrs in UNUSED_IMPORTS.items():
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        package, _, leaf = name.rpartition(".")
        placeholder = _Deferred(name)
        placeholder.__spec__ = spec
        if spec.submodule_search_locations is not None:  # a package: ``from X import y``
            # looks for __path__, which must not import it
            placeholder.__path__ = list(spec.submodule_search_locations)
        for attr in attrs:
            setattr(placeholder, attr, _forward(placeholder, attr))
        sys.modules[name] = placeholder
        if package:
            setattr(importlib.import_module(package), leaf, placeholder)
