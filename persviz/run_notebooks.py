"""The main job: execute every notebook and write the executed copies and their figures (part of the door).

    persviz notebooks --out outputs                      # embedded default (ShapesWorld)
    PERSVIZ_SCALE=full persviz notebooks --out outputs   # full scale, on a GPU with the Hub weights cached
"""
from __future__ import annotations

import base64
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from tqdm.auto import tqdm

from persviz.io import PathLike, atomic_write, atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]


def run_notebook(path: Path, out_dir: Path, timeout: int = 900) -> list[Path]:
    """Execute one notebook in its folder; write the executed copy and each PNG output atomically."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / path.name, lambda tmp: nbformat.write(nb, str(tmp)))
    figures = []
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    for ci, cell in enumerate(nb.cells):
        for oi, output in enumerate(cell.get("outputs", [])):
            png = output.get("data", {}).get("image/png")
            if png:
                target = fig_dir / f"{path.stem}_cell{ci:02d}_{oi}.png"
                atomic_write_bytes(target, base64.b64decode(png))
                figures.append(target)
    return figures


def run_all(notebooks: Sequence[PathLike] = (), out: PathLike = "outputs") -> dict[str, list[Path]]:
    """Execute the given notebooks (default: every one in notebooks/) into `out`; returns their figures by name."""
    paths = [Path(n) for n in notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not paths:
        raise ValueError(f"no notebooks found in {ROOT / 'notebooks'}")
    out = Path(out).resolve()
    figures = {}
    for path in tqdm(paths, desc="notebooks"):
        figures[path.name] = run_notebook(path.resolve(), out)
        print(f"{path.name}: {len(figures[path.name])} figures -> {out}")
    return figures


if __name__ == "__main__":
    from persviz.cli import main

    main(["notebooks", *sys.argv[1:]])
