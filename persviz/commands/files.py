"""``persviz inspect`` and ``persviz fix``: any tool's embedding file diagnosed, and repaired with TEA."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from persviz.commands.common import doc


def add_parser(sub: Any) -> None:
    """Adds ``inspect`` and ``fix``."""
    p = sub.add_parser("inspect", help="the collapse diagnosis of one embedding file (any tool's format)",
                       description=doc("persviz.tea.inspect_file"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a Textual Inversion / Custom Diffusion token file (diffusers, A1111 .pt or image "
                   "embedding, kohya, the original Textual Inversion), or a folder of several: each is listed")
    p.add_argument("--model", default=None, help="Hub id, folder or single-file .safetensors checkpoint (default: "
                   "ShapesWorld; SD 1.5 with PERSVIZ_SCALE=full)")
    p.add_argument("--class-word", default=None, help="one-token class word: adds |V*|/|c| and cos(V*, c)")
    p.add_argument("--nearest", type=int, default=5, help="nearest vocabulary words per row")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=inspect)

    p = sub.add_parser("fix", help="bake token-level TEA into a new embedding file of the same format",
                       description=doc("persviz.tea.fix_file"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the embedding file to repair (left as it is)")
    p.add_argument("--class-word", required=True, help="the concept's class, one token (e.g. dog)")
    p.add_argument("--out", required=True, help="the new file (never the input); an A1111 image embedding is written "
                   "as NAME.safetensors")
    p.add_argument("--rotation", type=float, default=None, help="default: tea.DEFAULTS[method]")
    p.add_argument("--scale", type=float, default=None, help="default: tea.DEFAULTS[method]")
    p.add_argument("--method", default="textual_inversion", help="whose TEA defaults to use")
    p.add_argument("--model", default=None, help="Hub id, folder or single-file .safetensors checkpoint (default: "
                   "ShapesWorld; SD 1.5 with PERSVIZ_SCALE=full)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=fix)


def text_stack_of(a: argparse.Namespace) -> Any:
    """The text stack of --model (every encoder: SDXL has two); a model that cannot be loaded ends the command."""
    from persviz.tea import inspect_file
    try:
        return inspect_file.load_text_stack(a.model)
    except OSError as err:
        raise SystemExit(f"persviz {a.command}: {err}") from None


def inspect(a: argparse.Namespace) -> Any:
    """Prints the diagnosis of the file (or of every embedding in the folder); returns the report(s)."""
    from persviz import embedding_files
    from persviz.io import to_jsonable
    from persviz.loading import default_model
    from persviz.tea import inspect_file
    if Path(a.file).expanduser().is_dir() and not any((Path(a.file).expanduser() / n).is_file()
                                                      for n in embedding_files.FOLDER_FILES):
        embedding_files.read_embedding_folder(a.file)  # a folder without embeddings: its sentence, no model load
        found = inspect_file.inspect_folder(a.file, text_stack_of(a), a.class_word, a.nearest,
                                            model_name=str(a.model or default_model("pipeline")))
        print(json.dumps(to_jsonable({str(p): r.to_dict() if isinstance(r, inspect_file.InspectReport) else
                                      [x.to_dict() for x in r] if isinstance(r, list) else
                                      {"error": str(r)} for p, r in found}), indent=1) if a.json
              else inspect_file.folder_text(a.file, found))
        return found
    f = embedding_files.read_embedding_file(a.file)
    reports = inspect_file.inspect_stack(f, text_stack_of(a), a.class_word, a.nearest,
                                         model_name=str(a.model or default_model("pipeline")))
    if len(reports) == 1:  # one text encoder (SD 1.x): one report
        print(json.dumps(to_jsonable(reports[0].to_dict()), indent=1) if a.json else reports[0].to_text())
        return reports[0]
    print(json.dumps(to_jsonable({"encoders": [r.to_dict() for r in reports]}), indent=1) if a.json
          else "\n\n".join(r.to_text() for r in reports))
    return reports


def fix(a: argparse.Namespace) -> Any:
    """Writes the repaired file (--out) and prints what changed; returns the FixResult."""
    from persviz import embedding_files
    from persviz.tea import fix_file
    fix_file.check_knobs(a.method, a.rotation, a.scale)
    f = embedding_files.read_embedding_file(a.file)
    fix_file.fix_target(f, a.out, a.force)
    result = fix_file.fix_embedding(f.path, text_stack_of(a), a.class_word, a.out, a.rotation, a.scale,
                                    a.method, a.force)
    print(result.to_text())
    return result
