"""The main job: execute every notebook and write the executed copies and their figures (part of the door).

    persviz notebooks --out outputs                              # embedded default (ShapesWorld)
    persviz notebooks --out outputs-full --scale full            # full scale: SD 1.5 and a concept of your own
    persviz notebooks --out outputs --format png,svg,pdf         # every figure in three formats

Each notebook runs on its own kernel; one that fails is recorded (its partly executed copy, with the error, is
written like the others) and the rest still run. A summary table ends the run; the exit code is non-zero only if a
notebook failed that applies at the scale in force (Pigeon is ShapesWorld-only and is left out at full scale, with
one line saying why). Every figure is written in the asked formats with a sidecar ``.json`` of provenance: persviz's
version and commit, the scale, the models and their file hashes, the notebook and cell, the package versions and
the ``PERSVIZ_*`` settings.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from tqdm.auto import tqdm

from persviz.io import PathLike, atomic_write, atomic_write_bytes, write_json
from huggingface_hub import constants as hub_constants

from persviz.constants import SCALE_ENV, SCALES, SHAPESWORLD
from persviz.loading import FULL_DEFAULTS
from persviz.paths import SHAPESWORLD_DIR

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
FORMATS = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}
# Notebooks that run at ShapesWorld scale only, and why.
SHAPESWORLD_ONLY: Mapping[str, str] = {
    "04_pigeon": "Pigeon's backbone (LaVIT-7B with SDXL) is out of reach; persviz runs it on ShapesWorld only",
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PACKAGES = ("torch", "diffusers", "transformers", "peft", "open_clip_torch", "numpy", "matplotlib")


@dataclass
class NotebookRun:
    """What happened to one notebook: 'ok', 'failed' or 'skipped', with its time, figures and error."""

    name: str
    status: str
    seconds: float = 0.0
    figures: list[Path] = field(default_factory=list)
    error: str = ""
    copy: Path | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _commit() -> str | None:
    """The git commit of the source tree persviz runs from (with '+dirty' for local changes), or None."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("persviz", *PACKAGES):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def model_files(scale: str) -> dict[str, str]:
    """What identifies the models in force: the sha256 of ShapesWorld's shipped weight files, or at full scale the
    commit of each Hub model in the local Hugging Face cache (read offline from refs/main; nothing is downloaded)
    and the sha256 of the files of the concept folders named by PERSVIZ_CONCEPT."""
    if scale == SHAPESWORLD:
        return {str(p.relative_to(SHAPESWORLD_DIR.parent)): _sha256(p)
                for p in sorted(SHAPESWORLD_DIR.glob("*/**/*.safetensors")) if "concepts" not in p.parts}
    out = {}
    for hub_id in FULL_DEFAULTS.values():
        ref = Path(hub_constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "refs" / "main"
        out[hub_id] = ref.read_text().strip() if ref.is_file() else "not in the local cache"
    for concept in filter(None, os.environ.get("PERSVIZ_CONCEPT", "").split(",")):
        for f in sorted(Path(concept).expanduser().rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".json"):
                out[str(f)] = _sha256(f)
    return out


def provenance(scale: str, notebook: Path, extra: Mapping | None = None) -> dict:
    """The record written beside each figure (and once per run in summary.json)."""
    return {
        "persviz": _versions()["persviz"], "commit": _commit(), "scale": scale,
        "notebook": notebook.name, "notebook_sha256": _sha256(notebook),
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("PERSVIZ_") or k in (
            "HF_HUB_OFFLINE", "OMP_NUM_THREADS")},
        "versions": _versions(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(dict(extra) if extra else {}),
    }


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The asked figure formats, checked: a subset of png, svg, pdf."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown figure format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    return formats


def _kernel_arguments(formats: Sequence[str]) -> list[str]:
    """IPython options that make the inline backend emit every asked format for each figure."""
    return [f"--InlineBackend.figure_formats={sorted(set(formats) | {'png'})!r}"]


def _write_figures(nb, path: Path, fig_dir: Path, formats: Sequence[str], record: dict) -> list[Path]:
    figures = []
    for ci, cell in enumerate(nb.cells):
        for oi, output in enumerate(cell.get("outputs", [])):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            stem = f"{path.stem}_cell{ci:02d}_{oi}"
            for fmt in formats:
                payload = data.get(FORMATS[fmt])
                if payload is None:
                    continue
                target = fig_dir / f"{stem}.{fmt}"
                raw = payload.encode() if fmt == "svg" else base64.b64decode(payload)
                atomic_write_bytes(target, raw)
                figures.append(target)
            write_json(fig_dir / f"{stem}.json", {**record, "cell": ci, "output": oi,
                                                  "formats": [f for f in formats if FORMATS[f] in data]})
    return figures


def run_notebook(path: Path, out_dir: Path, timeout: int = 900, formats: Sequence[str] = ("png",),
                 scale: str = SHAPESWORLD, models: Mapping[str, str] | None = None) -> NotebookRun:
    """Execute one notebook in its folder; write the executed (or partly executed) copy, each figure in the asked
    formats and its provenance, atomically. A failing cell is recorded in the result, not raised."""
    path, out_dir = Path(path), Path(out_dir)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", extra_arguments=_kernel_arguments(formats),
                            resources={"metadata": {"path": str(path.parent)}})
    start, error = time.perf_counter(), ""
    try:
        client.execute()
    except CellExecutionError as e:
        text = ANSI.sub("", str(e)).strip()
        error = text.splitlines()[-1] if text else type(e).__name__
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = atomic_write(out_dir / path.name, lambda tmp: nbformat.write(nb, str(tmp)))
    record = provenance(scale, path, {"models": dict(models) if models is not None else model_files(scale)})
    figures = _write_figures(nb, path, out_dir / "figures", formats, record)
    return NotebookRun(path.stem, "failed" if error else "ok", seconds, figures, error, copy)


def summary_table(runs: Sequence[NotebookRun]) -> str:
    """The runs as a plain-text table: notebook, status, seconds, figures, error or reason."""
    rows = [("notebook", "status", "seconds", "figures", "note")]
    rows += [(r.name, r.status, f"{r.seconds:.0f}", str(len(r.figures)), r.error) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + ("  " + row[4] if row[4] else "")
                     for row in rows)


def run_all(notebooks: Sequence[PathLike] = (), out: PathLike = "outputs", scale: str | None = None,
            formats: Sequence[str] = ("png",), timeout: int = 900) -> list[NotebookRun]:
    """Execute the given notebooks (default: every one in notebooks/) into `out` at `scale` (default: the
    PERSVIZ_SCALE in force, else ShapesWorld); returns one NotebookRun each and writes out/summary.json."""
    scale = (scale or os.environ.get(SCALE_ENV) or SHAPESWORLD).strip().lower()
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} is not one of {SCALES}")
    formats = check_formats(formats)
    paths = [Path(n) for n in notebooks] or sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no notebooks found in {NOTEBOOKS_DIR}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"no such notebook: {', '.join(missing)}")
    out = Path(out).resolve()
    runs, before = [], os.environ.get(SCALE_ENV)
    os.environ[SCALE_ENV] = scale  # the kernels inherit it: the flag wins over an exported PERSVIZ_SCALE
    models = model_files(scale)
    try:
        for path in tqdm(paths, desc="notebooks"):
            if scale != SHAPESWORLD and path.stem in SHAPESWORLD_ONLY:
                runs.append(NotebookRun(path.stem, "skipped", error=f"left out at {scale} scale: "
                                                                    f"{SHAPESWORLD_ONLY[path.stem]}"))
                continue
            runs.append(run_notebook(path.resolve(), out, timeout, formats, scale, models))
    finally:
        if before is None:
            os.environ.pop(SCALE_ENV, None)
        else:
            os.environ[SCALE_ENV] = before
    write_json(out / "summary.json", {"scale": scale, "formats": list(formats), "models": models, "runs": [
        {"notebook": r.name, "status": r.status, "seconds": r.seconds, "error": r.error,
         "figures": [str(f.relative_to(out)) for f in r.figures]} for r in runs]})
    return runs


def exit_code(runs: Sequence[NotebookRun]) -> int:
    """0 when every notebook that applies at the scale ran, 1 when one failed."""
    return int(any(r.status == "failed" for r in runs))
