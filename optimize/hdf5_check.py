"""An HDF5 weights file is checked to read only its own bytes before Keras opens it.

HDF5 lets a dataset keep its bytes elsewhere: *external storage* (raw bytes at any path, read
when the array is read), *virtual datasets* (slices of other HDF5 files) and *external links*
(a name that opens another file). A filter with an unknown id makes the library look for a
plugin, a shared library it loads and runs. Any of these turns "read the weights" into "read
the build machine's files" (an AWS key, copied into a signed pack) or "run a library". Keras
never writes them, so each is refused; the walk reads only metadata, never a dataset's data.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError

TRUST_FLAG = "--trust-model-code"

MAX_OBJECTS = 100_000  # a model's weights are a few thousand datasets at most
# HDF5's own filters, built into the library, and LZF, which h5py itself implements: no plugin
# is looked for. Ids from the HDF5 filter registry.
STANDARD_FILTERS = {
    1: "deflate",
    2: "shuffle",
    3: "fletcher32",
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
    32000: "lzf",
}


def _refuse(
    where: str, what: str, why: str = "reading the weights would read another file"
) -> ConfigError:
    return ConfigError(
        f"{where} {what}: {why}, and Keras never writes one, so it is not loaded by default;"
        f" save the model again with model.save('model.keras'), or pass {TRUST_FLAG} if you"
        " trust its author"
    )


def _check_dataset(where: str, name: str, dataset: Any) -> None:
    import h5py

    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise _refuse(where, f"has a virtual dataset {name!r} (slices of other files)")
    if plist.get_external_count() > 0:
        target = plist.get_external(0)[0].decode(errors="replace")
        raise _refuse(where, f"stores the dataset {name!r} in an external file ({target!r})")
    for index in range(plist.get_nfilters()):
        code, _flags, _values, label = plist.get_filter(index)
        if code not in STANDARD_FILTERS:
            label = label.decode(errors="replace") or "unnamed"
            raise _refuse(
                where,
                f"needs the HDF5 filter {code} ({label}) for the dataset {name!r}",
                "HDF5 would load it as a plugin, a shared library that runs on this machine",
            )


def _walk(where: str, root: Any) -> None:
    """Every link of the file, depth first, following hard links only, each object once."""
    import h5py

    seen: set[Any] = set()
    stack: list[tuple[str, Any]] = [("", root)]
    count = 0
    while stack:
        path, group = stack.pop()
        for key in group:  # H5Literate: names only, no target is opened
            name = f"{path}/{key}"
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise _refuse(where, f"has an external link {name!r} to {link.filename!r}")
            if not isinstance(link, h5py.HardLink):  # soft and user-defined links
                kind = "soft link" if isinstance(link, h5py.SoftLink) else "user-defined link"
                raise _refuse(where, f"has a {kind} {name!r}", "only plain (hard) links are read")
            obj = group[key]
            address = h5py.h5o.get_info(obj.id).addr
            if address in seen:  # a group linked into itself is a cycle, not more data
                continue
            seen.add(address)
            count += 1
            if count > MAX_OBJECTS:
                raise ConfigError(f"{where} holds more than {MAX_OBJECTS} objects; not weights")
            if isinstance(obj, h5py.Dataset):
                _check_dataset(where, name, obj)
            elif isinstance(obj, h5py.Group):
                stack.append((name, obj))


def check_hdf5(source: bytes | Path, where: str) -> None:
    """Refuse an HDF5 file that would read bytes from anywhere but itself, or load a plugin."""
    import h5py

    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with h5py.File(handle, "r") as h5:
            _walk(where, h5)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{where} is not a readable HDF5 file: {reason}") from exc
