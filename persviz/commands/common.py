"""What the command modules share: help texts read from the library's docstrings without importing the library,
``--threads``, the options of the sharded grid commands, the relaunch over several processes and the grid's models.

Library imports sit inside the functions, as in every command module (``persviz.commands``)."""
from __future__ import annotations

import argparse
import ast
import io
import tokenize
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]


def source_file(module: str) -> Path:
    """The source file of a persviz module ('persviz.tea.sweep' -> persviz/tea/sweep.py), without importing it."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def doc(module: str, function: str | None = None) -> str | None:
    """The docstring of a persviz module, or of one of its top-level functions, as ``__doc__`` gives it (not
    dedented), read from its source file: a parser's help text that imports no torch."""
    source = source_file(module).read_text(encoding="utf-8")
    if function is None:  # the module's: its first token that is not a comment or a blank line, if a string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                return ast.literal_eval(tok.string) if tok.type == tokenize.STRING else None
        return None
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            return ast.get_docstring(node, clean=False)
    raise LookupError(f"{module} has no top-level function {function}")


def threads(n: int | None) -> None:
    """torch.set_num_threads(n) when --threads was given."""
    if n:
        import torch
        torch.set_num_threads(int(n))


def floats(text: str) -> tuple[float, ...]:
    """'0,0.2,0.4' -> (0.0, 0.2, 0.4): an argparse type."""
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_processes(p: Any) -> None:
    """--processes: how many processes to shard a grid over."""
    p.add_argument("--processes", type=int, default=1,
                   help="processes to shard the grid over (accelerate launches them; one per GPU, or CPU processes "
                        "over gloo); `accelerate launch -m persviz ...` works too")


def add_grid_options(p: Any, dino: bool = True) -> None:
    """The options of every sharded grid command: sampler, judges, processes, threads, progress."""
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 25 ShapesWorld, 50 SD 1.5)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: 4 ShapesWorld, 7 SD 1.5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip", default=None, help="CLIP evaluator (default: the scale's)")
    if dino:
        p.add_argument("--dino", default=None, help="DINO evaluator (default: the scale's)")
    add_processes(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per process)")
    p.add_argument("--no-progress", action="store_true")


def relaunch(a: argparse.Namespace) -> int | None:
    """With --processes N > 1 outside a launch: the same command again in N processes through accelerate, its exit
    code; None when this process is the one to run (one process, or already launched)."""
    from persviz import shards
    if a.processes < 1:
        raise SystemExit(f"persviz {a.command}: --processes must be at least 1; got {a.processes}")
    if a.processes == 1 or shards.launched():
        return None
    code = shards.relaunch(shards.strip_option(a.argv, "--processes"), a.processes, a.threads)
    if code:
        raise SystemExit(f"persviz {a.command}: a process of the {a.processes} failed (exit {code}); the cells written "
                         "so far are kept, run the same command again to resume")
    return code


def process_device(state: Any) -> str | None:
    """This process's GPU when launched on several GPUs (each process its own), else the default device."""
    return str(state.device) if state.device.type == "cuda" else None


def grid_models(a: argparse.Namespace, model: str, judges: tuple[str, ...] = ("clip", "dino", "oracle")) -> tuple:
    """(process state, pipeline, clip, dino, oracle) of a sharded grid command on this process's device: the
    model's pipeline from the one assembler (its family checked; at full scale the paper's sampler and one image
    decoded at a time, as the notebooks' setup) and the scale's judges (None for those not asked; the oracle on
    ShapesWorld only)."""
    from persviz import shards
    from persviz.families import assemble_pipeline
    from persviz.loading import FULL_DEFAULTS, is_embedded, load_evaluator
    state = shards.process_state()
    device = process_device(state)
    small = is_embedded(model)
    pipe = assemble_pipeline(model, device=device)
    clip = load_evaluator(a.clip or (None if small else FULL_DEFAULTS["clip"]), kind="clip", device=device)
    dino = (load_evaluator(a.dino or (None if small else FULL_DEFAULTS["dino"]), kind="dino", device=device)
            if "dino" in judges else None)
    oracle = load_evaluator(kind="oracle", device=device) if small and "oracle" in judges else None
    return state, pipe, clip, dino, oracle
