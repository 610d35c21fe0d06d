"""``persviz study`` and ``persviz sweep``: a concept folder's TEA study and the rotation x scale grid (sharded)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from persviz.commands.common import add_grid_options, doc, floats, grid_models, relaunch, threads
from persviz.methods import METHODS


def add_parser(sub: Any) -> None:
    """Adds ``study`` and ``sweep``."""
    p = sub.add_parser("study", help="the TEA study of a concept folder: shift tracker, impacts, with/without TEA",
                       description=doc("persviz.tea.concept_study"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", help="the concept folder (with concept.json)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS} (default: every run)")
    p.add_argument("--probes", type=int, default=12, help="contextual prompts")
    p.add_argument("--repeats", type=int, default=1, help="images per prompt")
    p.add_argument("--every", type=int, default=500, help="snapshot spacing of the image-space study")
    add_grid_options(p)
    p.set_defaults(run=study)

    p = sub.add_parser("sweep", help="token-level TEA over rotation x scale on a concept's Textual Inversion run, "
                       "every image scored; sharded, resumable", description=doc("persviz.tea.sweep"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", help="the concept folder (with a Textual Inversion run)")
    p.add_argument("--rotations", type=floats, default=(0.0, 0.2, 0.4), help="comma-separated, in [0, 1]")
    p.add_argument("--scales", type=floats, default=(0.0, 0.5, 1.0), help="comma-separated, in [0, 1]")
    p.add_argument("--prompts", type=int, default=48, help="contextual prompts")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="first generation seed")
    p.add_argument("--chunk", type=int, default=None, help="prompts per cell (default: all prompts in one cell)")
    p.add_argument("--out", required=True, help="results folder: cells/, manifest.json, sweep.json")
    add_grid_options(p)
    p.set_defaults(run=sweep)


def study(a: argparse.Namespace) -> Any:
    """The concept folder's study: study/study.json and its figures (the main process writes them)."""
    code = relaunch(a)  # before the imports: the launching process only waits
    if code is not None:
        return code
    from persviz import shards
    from persviz.concept_folder import check_method, format_paths, read_concept
    from persviz.io import check_write
    from persviz.tea import concept_study
    threads(a.threads)
    concept = read_concept(a.concept)
    check_write(Path(concept.folder) / concept_study.STUDY_DIR)  # a study/ that leads out fails before any model loads
    if shards.process_state().is_main_process:
        print(format_paths(concept))
    state, pipe, clip, dino, oracle = grid_models(a, concept.model)
    settings = concept_study.StudySettings(a.probes, a.repeats, a.every, a.steps, a.guidance, a.batch_size)
    methods = [check_method(m) for m in a.methods.split(",")] if a.methods else None
    out = concept_study.study_concept(concept.folder, pipe, clip, dino, oracle, settings, methods,
                                      progress=not a.no_progress, state=state)
    if out is None:  # not the main process: the main one gathers and writes
        return None
    print(f"wrote {Path(concept.folder) / concept_study.STUDY_DIR / 'study.json'} and {len(out['figures'])} figures")
    return out


def sweep(a: argparse.Namespace) -> Any:
    """Token-level TEA over rotation x scale, every image scored: OUT/sweep.json (the main process writes it)."""
    code = relaunch(a)  # before the imports: the launching process only waits
    if code is not None:
        return code
    from persviz.concept_folder import read_concept
    from persviz.constants import SHAPESWORLD
    from persviz.tea import concept_study
    from persviz.tea import sweep as tea_sweep
    threads(a.threads)
    tea_sweep.sweep_cells(a.rotations, a.scales, a.prompts, a.chunk)  # bad knobs fail before any model loads
    concept = read_concept(a.concept)
    small = concept.model == SHAPESWORLD
    state, pipe, clip, dino, oracle = grid_models(a, concept.model)
    gen = concept_study.StudySettings(steps=a.steps, guidance=a.guidance, batch_size=a.batch_size).generation(small)
    ev = tea_sweep.run_sweep(concept.folder, pipe, clip, dino, oracle, a.rotations, a.scales, a.prompts, a.seeds,
                             a.out, a.seed, a.chunk, gen["steps"], gen["guidance"], gen["batch_size"], state,
                             progress=not a.no_progress)
    if ev is not None:
        print(f"wrote {Path(a.out) / tea_sweep.SWEEP_JSON}: {len(ev.conditions)} conditions x "
              f"{a.prompts} prompts x {a.seeds} seeds ({state.num_processes} process(es))")
    return ev
