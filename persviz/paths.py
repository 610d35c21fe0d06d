"""Where persviz finds its shipped data (the trained ShapesWorld models and the study files, about 51 MB).

The data lives in the repository's top-level ``data/`` folder; it is not inside the wheel. Lookup order:

1. the folder named by the environment variable ``PERSVIZ_DATA`` (holding ``shapesworld/``, ``finexl/``,
   ``pigeon/``, ``prompts/``, ``sd15/``);
2. the repository's ``data/`` beside the package (a clone, or an editable install ``pip install -e .``).

``DATA_DIR`` and ``SHAPESWORLD_DIR`` are plain paths computed at import, which never raises; code that loads data
calls :func:`data_dir` / :func:`shapesworld_dir`, which raise :class:`DataNotFoundError` (a FileNotFoundError)
with one sentence on how to get the data when neither place holds it (e.g. after ``pip install persviz`` from a
wheel, without ``PERSVIZ_DATA``).
"""
from __future__ import annotations

import os
from pathlib import Path
from persviz.errors import PersvizError

PACKAGE_ROOT = Path(__file__).resolve().parent
DATA_ENV = "PERSVIZ_DATA"
REPO_DATA_DIR = PACKAGE_ROOT.parent / "data"
MARKER = "shapesworld"  # a data folder holds at least shapesworld/


class DataNotFoundError(FileNotFoundError, PersvizError):
    """persviz's data folder (ShapesWorld models, study files) is neither in PERSVIZ_DATA nor beside the package."""


def _candidate() -> Path:
    env = os.environ.get(DATA_ENV, "").strip()
    return Path(env).expanduser() if env else REPO_DATA_DIR


def data_dir() -> Path:
    """The data folder: $PERSVIZ_DATA if set, else the repository's data/; DataNotFoundError when it is missing."""
    folder = _candidate()
    if (folder / MARKER).is_dir():
        return folder
    if os.environ.get(DATA_ENV, "").strip():
        where = f"{DATA_ENV}={str(folder)!r} does not hold a '{MARKER}/' folder"
    else:
        where = f"{DATA_ENV} is not set and there is no data/ folder beside the package ({REPO_DATA_DIR})"
    raise DataNotFoundError(
        f"persviz's data (the trained ShapesWorld models, about 51 MB) was not found: {where}. It lives in the "
        f"data/ folder of the persviz repository, not in the wheel: clone the repository and install from the "
        f"clone (pip install -e .), or set {DATA_ENV} to the clone's data/ folder.")


def shapesworld_dir() -> Path:
    """The ShapesWorld models folder (``data_dir() / 'shapesworld'``); DataNotFoundError when the data is missing."""
    return data_dir() / MARKER


# Import-time constants for `from persviz.paths import DATA_DIR, SHAPESWORLD_DIR` (they never raise; in a
# non-editable install without PERSVIZ_DATA they name a folder that does not exist).
DATA_DIR = _candidate()
SHAPESWORLD_DIR = DATA_DIR / MARKER
