"""Writing results all-or-nothing: everything is computed first, then each file is replaced."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["check_out_dir", "json_bytes", "npy_bytes", "npz_bytes", "write_files"]


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **kwds as allow_pickle
    return buf.getvalue()


def write_files(out_dir: str | os.PathLike,
                files: Mapping[str, bytes | Callable[[], bytes]]) -> list[Path]:
    """Write ``files`` (name -> content) into out_dir; each file appears whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blobs = {name: (content() if callable(content) else content) for name, content in files.items()}
    written = []
    for name, blob in blobs.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written


def check_out_dir(path: str | os.PathLike) -> None:
    """An output folder must be a folder (or creatable as one): checked before any work."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder '{out}' is a file; name a folder (it is created if "
                         "missing)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output folder '{out}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder '{out}': '{parent}' is not writable; choose a "
                         "writable place")
