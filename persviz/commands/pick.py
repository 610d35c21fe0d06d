"""``persviz pick`` and ``persviz repair``: which checkpoint to keep, and which test-time fix to apply to it."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from persviz.commands.common import add_grid_options, doc, grid_models, relaunch, threads
from persviz.constants import CONCEPT_NAMES
from persviz.methods import METHODS


def concept_folder(name_or_folder: str) -> Path:
    """A concept folder, or a shipped ShapesWorld concept's name ('candy') standing for its folder."""
    from persviz.errors import PersvizError
    from persviz.shapesworld.concepts import CONCEPTS_DIR  # heavy: the world's modules
    p = Path(name_or_folder).expanduser()
    if p.is_dir():
        return p
    if name_or_folder in CONCEPT_NAMES:
        return CONCEPTS_DIR / name_or_folder
    raise PersvizError(f"{name_or_folder} is neither a concept folder nor a shipped concept; pass a folder with "
                       f"concept.json or one of {', '.join(CONCEPT_NAMES)}")


def out_folder(a: argparse.Namespace) -> Path:
    """Where pick/ and repair/ go: --out, else the concept folder (a shipped concept: outputs/<name>)."""
    if a.out:
        return Path(a.out)
    return Path("outputs") / a.concept if a.concept in CONCEPT_NAMES and not Path(a.concept).is_dir() \
        else Path(a.concept)


def add_parser(sub: Any) -> None:
    """Adds ``pick`` and ``repair``."""
    p = sub.add_parser("pick", help="which checkpoint to keep: identity against context per checkpoint of every "
                       "run, the front, the recommendation (docs/pick.md); OUT/pick/", description=doc("persviz.tea.pick"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", help="a concept folder (with concept.json) or a shipped ShapesWorld concept's name")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS} (default: every run)")
    p.add_argument("--out", default=None, help="where pick/ goes (default: the concept folder; a shipped concept: "
                   "outputs/<name>)")
    p.add_argument("--every", type=int, default=300, help="Textual Inversion snapshot spacing (default 300)")
    p.add_argument("--probes", type=int, default=24, help="contextual probes, one image each (default 24)")
    p.add_argument("--fast", action="store_true", help="the text-space signal alone, no image; recommends only where "
                   "the early-warning experiment found that it predicts collapse")
    add_grid_options(p)
    p.set_defaults(run=pick)

    p = sub.add_parser("repair", help="the test-time fixes side by side on one checkpoint, each knob swept, paired "
                       "against no fix; OUT/repair/ (and --write the chosen fix)", description=doc("persviz.tea.repair"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", help="a concept folder (with concept.json) or a shipped ShapesWorld concept's name")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS} (default: every run)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint to repair (default: the final weights)")
    p.add_argument("--out", default=None, help="where repair/ goes (default: as pick)")
    p.add_argument("--probes", type=int, default=24, help="contextual probes, one image each (default 24)")
    p.add_argument("--write", action="store_true", help="write the first-ranked token-level fix into a file of the "
                   "run's format (as `persviz fix`), in OUT/repair/")
    add_grid_options(p)
    p.set_defaults(run=repair)


def _methods(a: argparse.Namespace) -> list[str] | None:
    from persviz.concept_folder import check_method
    return [check_method(m) for m in a.methods.split(",")] if a.methods else None


def pick(a: argparse.Namespace) -> Any:
    """The picker (or its --fast signal) on a concept folder."""
    code = relaunch(a)
    if code is not None:
        return code
    from persviz.concept_folder import read_concept
    from persviz.tea import pick as picker
    from persviz.tea.concept_study import StudySettings
    threads(a.threads)
    folder = concept_folder(a.concept)
    concept = read_concept(folder)
    t0 = time.perf_counter()
    if a.fast:
        from persviz.families import assemble_pipeline
        result = picker.fast_pick(folder, assemble_pipeline(concept.model), _methods(a), a.every, a.probes)
        print(picker.fast_text(result))
        print(f"pick --fast took {time.perf_counter() - t0:.1f} s")
        return result
    state, pipe, clip, dino, oracle = grid_models(a, concept.model)
    settings = StudySettings(steps=a.steps, guidance=a.guidance, batch_size=a.batch_size)
    result = picker.pick(folder, pipe, clip, dino, oracle, _methods(a), out_folder(a), a.every, a.probes, settings,
                         progress=not a.no_progress, state=state)
    if result is not None:
        print(picker.pick_text(result))
        print(f"wrote {out_folder(a) / picker.PICK_DIR / 'pick.json'} and {len(result['figures'])} figure files "
              f"in {time.perf_counter() - t0:.1f} s")
    return result


def repair(a: argparse.Namespace) -> Any:
    """The fixes side by side on one checkpoint of each run."""
    code = relaunch(a)
    if code is not None:
        return code
    from persviz.concept_folder import read_concept
    from persviz.tea import repair as repairs
    from persviz.tea.concept_study import StudySettings
    threads(a.threads)
    folder = concept_folder(a.concept)
    concept = read_concept(folder)
    state, pipe, clip, dino, oracle = grid_models(a, concept.model)
    settings = StudySettings(steps=a.steps, guidance=a.guidance, batch_size=a.batch_size)
    result = repairs.repair(folder, pipe, clip, dino, oracle, _methods(a), a.step, out_folder(a), a.probes, settings,
                            write=a.write, progress=not a.no_progress, state=state)
    if result is not None:
        print(repairs.repair_text(result))
    return result
