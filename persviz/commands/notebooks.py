"""``persviz notebooks``: the main job (persviz.run_notebooks)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from persviz.commands.common import doc
from persviz.constants import SCALES


def add_parser(sub: Any) -> None:
    """Adds ``notebooks``."""
    p = sub.add_parser("notebooks", help="the main job: execute every notebook; write the copies and their figures",
                       description=doc("persviz.run_notebooks"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs", help="folder for executed notebooks and figures")
    p.add_argument("--scale", choices=SCALES, default=None,
                   help="shapesworld (default) or full; wins over PERSVIZ_SCALE")
    p.add_argument("--format", default="png", help="figure formats, comma-separated: png, svg, pdf")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: all in notebooks/)")
    p.set_defaults(run=notebooks)


def notebooks(a: argparse.Namespace) -> int:
    """Executes the notebooks, prints the summary table; the exit code says whether one failed."""
    from persviz import run_notebooks
    runs = run_notebooks.run_all(a.notebooks, Path(a.out), a.scale, a.format.split(","), a.timeout)
    print(run_notebooks.summary_table(runs))
    return run_notebooks.exit_code(runs)
