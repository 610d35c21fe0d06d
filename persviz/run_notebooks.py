"""The main job: execute every notebook and write the executed copies and their figures (part of the door).

    persviz notebooks --out outputs                              # embedded default (ShapesWorld)
    persviz notebooks --out outputs-full --scale full            # full scale: SD 1.5 and a concept of your own
    persviz notebooks --out outputs --format png,svg,pdf         # every figure in three formats

Each notebook runs on its own kernel; one that fails is recorded (its partly executed copy, with the error, is
written like the others) and the rest still run. A summary table ends the run; the exit code is non-zero only if a
notebook failed that applies at the scale in force (Pigeon is ShapesWorld-only and is left out at full scale, with
one line saying why). Every figure is written in the asked formats with a sidecar ``.json`` of provenance: persviz's
version and commit, the scale, the models and their file hashes, the notebook, cell and figure name, the package
versions and the ``PERSVIZ_*`` settings.

Figures are named for what they show: ``OUT/<notebook>/<figure>.<format>`` beside ``OUT/<notebook>/<figure>.json``
(``outputs/01_semantic_collapse/norm_histogram.png``). A cell names its figures in its metadata, on the jupytext
``# %%`` line: ``figure="norm_histogram"`` for a cell that draws one, ``figure=["a", "b"]`` for one that draws several
(the k-th figure the cell outputs takes the k-th name). Names are snake_case and unique within a notebook, checked
before anything runs. A figure without a name is still written, as ``unnamed_cell<NN>_<output>`` (the cell's and the
output's index in the notebook), and the summary lists it. Every write stays inside OUT (``persviz.io.confined``): a
symbolic link leading out is refused before any notebook runs, and nothing is deleted.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from tqdm.auto import tqdm

from persviz.io import PathLike, atomic_write, atomic_write_bytes, check_write, confined, write_json
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
FIGURE_KEY = "figure"  # the cell metadata key that names the cell's figures
FIGURE_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")  # snake_case: a file name on every platform
UNNAMED = "unnamed_"  # the fallback names' prefix, which no given name may take
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
    unnamed: list[Path] = field(default_factory=list)  # the figure files among `figures` whose cell gave no name


@dataclass(frozen=True)
class FigureOutput:
    """One figure a cell output: its name (given, or the unnamed fallback), its place and its data by mime type."""

    name: str
    named: bool
    cell: int
    output: int
    data: Mapping[str, str]


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
    concepts = [c.strip() for c in os.environ.get("PERSVIZ_CONCEPT", "").split(",") if c.strip()]
    models = list(FULL_DEFAULTS.values())
    for concept in concepts:  # the model each concept was trained on (the notebooks load it: SDXL, ...)
        try:
            model = json.loads((Path(concept).expanduser() / "concept.json").read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(model, str) and model not in models and not Path(model).expanduser().exists():
            models.append(model)
    for hub_id in models:
        ref = Path(hub_constants.HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}" / "refs" / "main"
        out[hub_id] = ref.read_text().strip() if ref.is_file() else "not in the local cache"
    for concept in concepts:
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


def cell_figure_names(cell: Mapping) -> list[str]:
    """The names a cell's metadata gives its figures, in output order: [] when it names none."""
    names = cell.get("metadata", {}).get(FIGURE_KEY, [])
    return list(names) if isinstance(names, list) else [names]  # a string, or anything else for the check to refuse


def check_figure_names(nb, where: str = "the notebook") -> dict[int, list[str]]:
    """{cell index: its figure names} of the cells that name figures, checked: each a snake_case string that does not
    start with 'unnamed_', unique within the notebook; a ValueError naming the cell otherwise."""
    out, seen = {}, {}
    for ci, cell in enumerate(nb.cells):
        names = cell_figure_names(cell)
        for name in names:
            if not isinstance(name, str) or not FIGURE_NAME.fullmatch(name) or name.startswith(UNNAMED):
                raise ValueError(f"{where}, cell {ci}: figure name {name!r} is not a snake_case name (a-z, 0-9, _) "
                                 f"or starts with {UNNAMED!r}; rename it in the cell's metadata")
            if name in seen:
                raise ValueError(f"{where}: figure name {name!r} is given to cell {seen[name]} and cell {ci}; "
                                 "each figure of a notebook needs its own name")
            seen[name] = ci
        if names:
            out[ci] = names
    return out


def figure_outputs(nb, where: str = "the notebook") -> Iterator[FigureOutput]:
    """Every figure output of an executed notebook (an output with image/png), named from its cell's metadata in
    output order; a figure beyond its cell's names (or of a cell without any) gets 'unnamed_cell<NN>_<output>'."""
    names = check_figure_names(nb, where)
    for ci, cell in enumerate(nb.cells):
        k = 0
        for oi, output in enumerate(cell.get("outputs", [])):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            given = names.get(ci, [])
            named = k < len(given)
            yield FigureOutput(given[k] if named else f"{UNNAMED}cell{ci:02d}_{oi}", named, ci, oi, data)
            k += 1


def write_figures(nb, stem: str, out_dir: Path, formats: Sequence[str], record: dict) -> tuple[list[Path], list[Path]]:
    """Write each figure of the executed notebook as out_dir/stem/<name>.<format> with its <name>.json of provenance,
    atomically and only inside out_dir; returns (the figure files, those of them without a name)."""
    figures, unnamed = [], []
    with confined(out_dir):
        fig_dir = check_write(Path(out_dir) / stem)
        for fig in figure_outputs(nb, stem):
            written = []
            for fmt in formats:
                payload = fig.data.get(FORMATS[fmt])
                if payload is None:
                    continue
                raw = payload.encode() if fmt == "svg" else base64.b64decode(payload)
                written.append(atomic_write_bytes(fig_dir / f"{fig.name}.{fmt}", raw))
            write_json(fig_dir / f"{fig.name}.json", {
                **record, "figure": fig.name, "named": fig.named, "cell": fig.cell, "output": fig.output,
                "formats": [f for f in formats if FORMATS[f] in fig.data]})
            figures += written
            unnamed += [] if fig.named else written
    return figures, unnamed


def run_notebook(path: Path, out_dir: Path, timeout: int = 900, formats: Sequence[str] = ("png",),
                 scale: str = SHAPESWORLD, models: Mapping[str, str] | None = None) -> NotebookRun:
    """Execute one notebook in its folder; write the executed (or partly executed) copy, each figure in the asked
    formats and its provenance, atomically. A failing cell is recorded in the result, not raised."""
    path, out_dir = Path(path), Path(out_dir)
    nb = nbformat.read(path, as_version=4)
    check_figure_names(nb, path.name)  # before the run, not after minutes of it
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", extra_arguments=_kernel_arguments(formats),
                            resources={"metadata": {"path": str(path.parent)}})
    start, error = time.perf_counter(), ""
    try:
        client.execute()
    except CellExecutionError as e:
        text = ANSI.sub("", str(e)).strip()
        error = text.splitlines()[-1] if text else type(e).__name__
    seconds = time.perf_counter() - start
    record = provenance(scale, path, {"models": dict(models) if models is not None else model_files(scale)})
    with confined(out_dir):
        copy = atomic_write(out_dir / path.name, lambda tmp: nbformat.write(nb, str(tmp)))
        figures, unnamed = write_figures(nb, path.stem, out_dir, formats, record)
    return NotebookRun(path.stem, "failed" if error else "ok", seconds, figures, error, copy, unnamed)


def _note(run: NotebookRun) -> str:
    """The table's note for one run: its error or reason, then its unnamed figures, if any."""
    unnamed = sorted({f.stem for f in run.unnamed})
    return "; ".join(filter(None, [run.error, f"unnamed figures: {', '.join(unnamed)}" if unnamed else ""]))


def summary_table(runs: Sequence[NotebookRun]) -> str:
    """The runs as a plain-text table: notebook, status, seconds, figures, error or reason and unnamed figures."""
    rows = [("notebook", "status", "seconds", "figures", "note")]
    rows += [(r.name, r.status, f"{r.seconds:.0f}", str(len(r.figures)), _note(r)) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + ("  " + row[4] if row[4] else "")
                     for row in rows)


def _check_notebooks(paths: Sequence[Path], out: Path) -> None:
    """Before anything runs: each notebook's figure names are valid, no two notebooks share a name, and each one's
    copy and figure folder resolve inside `out` (OutsideFolderError for a link leading out)."""
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"two notebooks named {', '.join(twice)} would write the same files in {out}; run them "
                         "into separate --out folders")
    for path in paths:
        check_figure_names(nbformat.read(path, as_version=4), path.name)
        check_write(out / path.name)
        check_write(out / path.stem)


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
    with confined(out):
        _check_notebooks(paths, out)
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
             "figures": [str(f.relative_to(out)) for f in r.figures],
             "unnamed": [str(f.relative_to(out)) for f in r.unnamed]} for r in runs]})
    return runs


def exit_code(runs: Sequence[NotebookRun]) -> int:
    """0 when every notebook that applies at the scale ran, 1 when one failed."""
    return int(any(r.status == "failed" for r in runs))
