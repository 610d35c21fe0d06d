"""Atomic writes and JSON: a file or folder appears whole or not at all, and every JSON result follows one NaN policy.

Data goes to a temporary file beside the target (``.{name}.XXXX.tmp``, made by ``tempfile.mkstemp``, so
concurrent writers never share one), which is then renamed onto the target (``os.replace``, atomic within a
folder); if writing fails, the temporary file is removed and the target is left as it was. Folders are written
whole into ``{name}.tmp`` and renamed into place. JSON: NaN and infinities become ``null`` (strict JSON, readable by
any parser), numpy and torch scalars and arrays become Python numbers and lists, paths become strings.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary file (created empty, mode 0644) beside `path` to write to; when the block ends it is renamed
    onto `path`, and if the block raises it is removed. Creates the folder of `path` if needed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are shared
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_path) (e.g. ``lambda p: save_file(state, p)``), then rename it onto path; returns the path."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write bytes to path atomically; returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write text to path atomically; returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_save(obj: Any, path: PathLike) -> Path:
    """torch.save through a temporary file, so a killed run never leaves half a snapshot; returns the path."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_folder(folder: PathLike, save: Callable[[Path], Any]) -> Path:
    """Call save(tmp_folder), then move the finished folder into place (a killed run leaves the old one whole)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def to_jsonable(x: Any) -> Any:
    """x with numpy/torch values as Python numbers and lists, paths as strings, NaN and infinities as None."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return to_jsonable(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, os.PathLike):
        return str(x)
    return x


def write_json(path: PathLike, obj: Any, indent: int | None = 1) -> Path:
    """obj as strict JSON (see to_jsonable), written atomically; returns the path."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n")


__all__ = ["PathLike", "atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_save",
           "atomic_folder", "to_jsonable", "write_json"]
