"""The door: ``persviz``, one command line for the main job and every maintenance command.

    persviz notebooks --out outputs                  # the main job: execute every notebook, write copies and figures
    persviz train textual-inversion --images DIR --class-word WORD --placeholder "<tok>" --out CONCEPT_DIR
    persviz adopt ti RUN --out CONCEPT_DIR --images DIR --class-word WORD   # another tool's run, as it is
    persviz study CONCEPT_DIR                        # shift tracker, impacts, with/without-TEA table: JSON, figures
    persviz pick CONCEPT_DIR [--fast]                # which checkpoint to keep (docs/pick.md): OUT/pick/
    persviz repair CONCEPT_DIR [--step k] [--write]  # the test-time fixes side by side: OUT/repair/
    persviz shapesworld train [--stages unet]        # retrain the ShapesWorld models (resumable)
    persviz shapesworld evaluate                     # re-measure them: data/shapesworld/metrics.json, MODEL_CARD.md
    persviz shapesworld concepts                     # the personal concepts' reference images
    persviz tea runs --study --table                 # TEA's ShapesWorld runs of the three methods, study, table
    persviz finexl train | persviz finexl benchmark  # FineXL's LoRA variants; the ground-truth benchmark
    persviz pigeon train --stage 1 | persviz pigeon study
    persviz inspect FILE [--class-word W]            # any tool's embedding file: norms, |V*|/|c|, cos, nearest words
    persviz fix FILE --class-word W --out NEW        # TEA baked into a new file of the same format
    persviz doctor                                   # versions, device, cached Hub models, what to download

The maintenance commands always work on ShapesWorld, whatever ``PERSVIZ_SCALE`` says. This module (with
``persviz/__main__.py``, the subcommands of ``persviz.commands`` and the notebook runner) sits above the three rooms
and may import all of them; nothing in the library imports it. Building the parser imports no torch: each
subcommand imports what it runs when it runs (``persviz.commands``).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from persviz.constants import CPU_OFFLOAD_ENV
from persviz.commands import concept, doctor, files, finexl, notebooks, pick, pigeon, shapesworld, study, tea
from persviz.errors import PersvizError, TrainingInterrupted, describe, one_line

#: The subcommand groups, in the order ``persviz --help`` lists them; each adds its subcommands (add_parser).
GROUPS = (notebooks, concept, study, pick, shapesworld, tea, finexl, pigeon, files, doctor)


def build_parser() -> argparse.ArgumentParser:
    """The ``persviz`` parser with every subcommand (light: no torch is imported until a command runs)."""
    ap = argparse.ArgumentParser(prog="persviz", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return ap


DEBUG_ENV = "PERSVIZ_DEBUG"
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def _write_root(a: argparse.Namespace) -> Path | None:
    """The folder the command was given to write in (a concept folder, a results folder), or None: every write of
    the command must resolve inside it (persviz.io.confined)."""
    if a.command in ("train", "adopt", "sweep", "notebooks") or (a.command == "finexl" and a.action == "explain"):
        return Path(a.out)
    if a.command == "study":
        return Path(a.concept)
    if a.command in ("pick", "repair"):  # a shipped concept's name writes to outputs/<name> (commands.pick)
        return Path(a.out) if a.out else None
    if a.command == "fix":
        return Path(a.out).expanduser().absolute().parent
    return None


def _run(args: argparse.Namespace) -> Any:
    from persviz.io import confined  # heavy: torch (persviz.io); only once a command runs, never for --help
    root = _write_root(args)
    if root is None:
        return args.run(args)
    root = root.expanduser()
    if root.exists() and not root.is_dir():
        raise PersvizError(f"{root} is a file, not a folder; name a folder (a new one is created)")
    with confined(root):
        return args.run(args)


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``persviz`` console script: runs the subcommand; an integer result is the exit code.

    Every error ends the command with one line naming the problem and the fix (persviz.errors.describe), without
    colour codes; ``--debug`` (anywhere on the line) or PERSVIZ_DEBUG=1 shows the traceback instead. Ctrl-C says
    where training stopped and exits 130."""
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    if "--cpu-offload" in raw:  # anywhere on the line: the pipeline's models wait on the CPU (cards under 80 GB)
        os.environ[CPU_OFFLOAD_ENV] = "1"
    args = build_parser().parse_args([a for a in raw if a not in ("--debug", "--cpu-offload")])
    args.argv = raw  # what a --processes N run launches again
    try:
        result = _run(args)
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"persviz {args.command}: " + (one_line(str(e)) if isinstance(e, TrainingInterrupted) else
                                             "interrupted (Ctrl-C); run the same command again to go on"),
              file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except Exception as e:
        if debug:
            raise
        raise SystemExit(f"persviz {args.command}: {describe(e)}") from None
    if argv is None:  # the console script: sys.exit(main()) takes an exit code, never a result object
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    return result


if __name__ == "__main__":
    main()
