"""persviz's own errors: each message is one sentence that names the problem and the fix.

The command line prints a :class:`PersvizError` (and the operating system's errors) as one line without a
traceback (``--debug`` or ``PERSVIZ_DEBUG=1`` shows it); library users catch ``PersvizError`` for all of them.
The older error classes (``ConceptFolderError``, ``EmbeddingFileError``, ...) derive from it as well as from the
built-in class they always were (``ValueError``, ``OSError``), so existing ``except`` clauses keep working.
"""
from __future__ import annotations

import errno
import re

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MAX_LINE = 600


class PersvizError(Exception):
    """An error of persviz's own whose message says what is wrong and how to fix it."""


class OutsideFolderError(PersvizError):
    """A write that would land outside the folder persviz was given (through a symbolic link or a path from a file)."""


class NotOursError(PersvizError):
    """persviz was about to replace or delete something it did not write; it leaves it alone and says so."""


class DamagedFileError(PersvizError):
    """A file persviz wrote earlier (a resume state, a cache) that no longer reads; the message says how to recover."""


class ConceptFolderError(PersvizError, ValueError):
    """A concept folder or a run folder that cannot be read or does not match what was asked; the message says how to
    fix it (defined here, below persviz.concept_folder, so the method modules can raise it when they read runs)."""


class ImageReadError(PersvizError, ValueError):
    """An image persviz cannot read faithfully (unknown mode, too large, damaged); the message says how to convert it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: where it stopped and that the same command resumes (still a KeyboardInterrupt)."""

    def __init__(self, message: str, step: int, saved: int | None) -> None:
        super().__init__(message)
        self.message, self.step, self.saved = message, step, saved

    def __str__(self) -> str:
        return self.message


def _os_sentence(err: OSError) -> str | None:
    """The operating system's error as a sentence naming the path and the fix; None when it names no errno."""
    if err.errno is None:
        return None
    name = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        name = f"{name} -> {err.filename2}"
    code = err.errno
    if code == errno.ENOENT:
        return f"{name} does not exist; check the path"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied for {name}; choose a folder you can read and write, or fix its permissions"
    if code == errno.EROFS:
        return f"{name} is on a read-only file system; choose a folder you can write to"
    if code == errno.ENOTDIR:
        return f"{name} (or a folder above it) is a file, not a folder; name a folder"
    if code == errno.EISDIR:
        return f"{name} is a folder where a file was expected; name a file"
    if code == errno.EEXIST:
        return f"{name} already exists; move it away or choose another name"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"the disk is full (writing {name}); free some space and run the same command again: what was "
                "finished is kept")
    if code == errno.ELOOP:
        return f"{name} is a loop of symbolic links; fix the link"
    return f"{err.strerror or type(err).__name__} ({name}); check the path and its permissions"


def one_line(text: str) -> str:
    """`text` without terminal colour codes, on one line, at most MAX_LINE characters."""
    flat = " ".join(ANSI.sub("", str(text)).split())
    return flat if len(flat) <= MAX_LINE else flat[:MAX_LINE - 3] + "..."


def describe(err: BaseException) -> str:
    """One line for the user: persviz's own sentence, the operating system's error with its path and fix, or, for
    anything unexpected, its kind and message and how to see the traceback."""
    if isinstance(err, PersvizError):
        return one_line(str(err))
    if isinstance(err, OSError):
        sentence = _os_sentence(err)
        return one_line(sentence if sentence is not None else str(err))
    if isinstance(err, ValueError) and str(err):
        return one_line(str(err))
    if isinstance(err, MemoryError):
        return "out of memory; use a smaller --batch-size (or fewer --threads / processes)"
    return one_line(f"unexpected {type(err).__name__}: {err}; run the same command with --debug for the traceback "
                    "and report it")


__all__ = ["ANSI", "MAX_LINE", "describe", "one_line", "DamagedFileError", "ImageReadError", "NotOursError", "OutsideFolderError", "PersvizError",
           "TrainingInterrupted"]
