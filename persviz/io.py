"""Atomic writes and JSON: a file or folder appears whole or not at all, and every JSON result follows one NaN policy.

Data goes to a temporary file beside the target (``.{name}.XXXX.tmp``, made by ``tempfile.mkstemp``, so
concurrent writers never share one), which is then renamed onto the target (``os.replace``, atomic within a
folder); if writing fails, the temporary file is removed and the target is left as it was. Folders are written
whole into a fresh temporary folder beside the target and renamed into place; an existing folder is replaced only when
the caller says it is persviz's own (``replace=True``). JSON: NaN and infinities become ``null`` (strict JSON, readable by
any parser), numpy and torch scalars and arrays become Python numbers and lists, paths become strings.

**The folder rule.** ``with confined(folder):`` resolves the folder a user named once; while it is active every
write and deletion through this module (and :func:`check_write` for others) must resolve inside it, so a symbolic
link (or a ``../`` path from a file) that leads out is refused with :class:`~persviz.errors.OutsideFolderError`
before anything is written. A folder confined inside another must itself resolve inside the outer one. Outside any
``confined`` block nothing is checked (a library call writes where it is told), but an atomic write never follows a
symbolic link at the target's own name: the link is replaced, not the file it points to.
"""
from __future__ import annotations

import contextlib
import contextvars
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

from persviz.errors import DamagedFileError, NotOursError, OutsideFolderError

PathLike = Union[str, os.PathLike]
_ROOTS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("persviz_write_roots", default=())


def write_root() -> Path | None:
    """The folder writes are confined to now (the innermost ``confined``), or None."""
    roots = _ROOTS.get()
    return roots[-1] if roots else None


def check_write(path: PathLike) -> Path:
    """`path` as a Path; an OutsideFolderError when a confined folder is active and `path` resolves outside it."""
    p = Path(path).expanduser()
    root = write_root()
    if root is None:
        return p
    real = Path(os.path.realpath(p))
    if real != root and root not in real.parents:
        how = "through a symbolic link" if real != Path(os.path.abspath(p)) else "by its path"
        raise OutsideFolderError(
            f"{p} leads outside {root} ({how}, to {real}); persviz writes only inside the folder it was given: "
            "remove the link or name the real folder")
    return p


@contextlib.contextmanager
def confined(folder: PathLike) -> Iterator[Path]:
    """Within the block, every write through persviz.io must resolve inside `folder` (resolved once, here; a folder
    inside an active one must resolve inside it). Yields the resolved folder."""
    root = Path(os.path.realpath(check_write(folder)))
    token = _ROOTS.set(_ROOTS.get() + (root,))
    try:
        yield root
    finally:
        _ROOTS.reset(token)


def make_dir(folder: PathLike) -> Path:
    """mkdir -p, refused (before anything is created) when the folder resolves outside the confined one."""
    p = check_write(folder)
    p.mkdir(parents=True, exist_ok=True)
    return p


def remove_file(path: PathLike) -> None:
    """Delete one file persviz wrote (a symbolic link is unlinked, never followed); checked like a write."""
    p = check_write(path)
    if p.is_dir() and not p.is_symlink():
        raise NotOursError(f"{p} is a folder where persviz expected one of its files; it is left as it is")
    p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary file (created empty, mode 0644) beside `path` to write to; when the block ends it is renamed
    onto `path`, and if the block raises it is removed. Creates the folder of `path` if needed."""
    p = check_write(path)
    make_dir(p.parent)
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


def atomic_folder(folder: PathLike, save: Callable[[Path], Any], replace: bool = False) -> Path:
    """Call save(tmp_folder) (a path that does not exist yet, in a fresh temporary folder beside `folder`), then move
    the finished folder into place; a killed run leaves the old one whole. An existing `folder` is replaced only with
    replace=True (the caller vouches it is persviz's own), else NotOursError; nothing else is ever deleted."""
    folder = check_write(folder)
    if (folder.exists() or folder.is_symlink()) and not replace:
        raise NotOursError(f"{folder} already exists and persviz replaces only folders it wrote; move it away or "
                           "choose another place")
    make_dir(folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp = staging / folder.name
        save(tmp)
        if folder.is_symlink():
            os.unlink(folder)  # the link, never what it points to
        elif folder.exists():
            old = staging / (folder.name + ".old")
            os.replace(folder, old)  # moved aside first: the new one is whole before the old one goes
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the temporary folder this call made, and only it
    return folder


def load_state(path: PathLike, fix: str, map_location: Any = "cpu") -> Any:
    """torch.load of a file persviz wrote (a resume state, a cache), always with weights_only=True; a file that does
    not load (damaged, truncated, or holding code) gives a DamagedFileError whose sentence ends with `fix`."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:  # a file object: torch.load would pick its reader by the suffix
            return torch.load(fh, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle and zip errors come in many classes
        raise DamagedFileError(f"{p} does not load as a persviz state file ({type(err).__name__}); {fix}") from None


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


__all__ = ["PathLike", "check_write", "confined", "make_dir", "remove_file", "write_root", "load_state", "atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_save",
           "atomic_folder", "to_jsonable", "write_json"]
