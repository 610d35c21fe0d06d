"""Atomic file writes: a file appears whole or not at all.

The data goes to a temporary file beside the target (``.{name}.XXXX.tmp``, made by ``tempfile.mkstemp``, so
concurrent writers never share one), which is then renamed onto the target (``os.replace``, atomic within a
folder); if writing fails, the temporary file is removed and the target is left as it was.
(``persviz.shapesworld.train.atomic_save`` / ``atomic_export`` are the ShapesWorld training's own versions for
torch files and folders, with fixed temporary names.)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary file (created empty) beside `path` to write to; when the block ends it is renamed onto
    `path`, and if the block raises it is removed. The folder of `path` must exist."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write bytes to path atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write text to path atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]
