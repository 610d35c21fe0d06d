"""``persviz tea runs | evaluate | findings | attention``: TEA's shipped ShapesWorld runs, their tables and attention study."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from persviz.commands.common import add_grid_options, doc, grid_models, relaunch, threads
from persviz.constants import ATTENTION_STEP_EVERY, ATTENTION_STUDY_JSON, CONCEPT_NAMES
from persviz.methods import METHODS


def add_parser(sub: Any) -> None:
    """Adds ``tea`` and its actions."""
    tea = sub.add_parser("tea", help="TEA's ShapesWorld runs").add_subparsers(dest="action", required=True)
    p = tea.add_parser("runs", help="train (or resume) the shipped runs; optionally their study and the TEA table",
                       description=doc("persviz.tea.shapesworld_runs"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--concepts", default=",".join(CONCEPT_NAMES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--study", action="store_true", help="also write each Textual Inversion run's study.json")
    p.add_argument("--table", action="store_true", help="write concepts/tea_table.json (all methods, with/without TEA, "
                   "per-image scores and intervals)")
    p.set_defaults(run=runs)

    p = tea.add_parser("evaluate", help="re-measure the shipped runs with the evaluation protocol (no training): "
                       "concepts/tea_table.json and adaptive_tea.json, per-image scores and intervals")
    p.add_argument("--what", default="table,adaptive", help="comma-separated: 'table' (with/without TEA, every "
                   "method), 'adaptive' (adaptive against fixed TEA on the Textual Inversion runs)")
    p.add_argument("--probes", type=int, default=24, help="prompts per concept of the table (2 seeds each; default 24)")
    p.add_argument("--adaptive-probes", type=int, default=8, help="prompts per concept of adaptive TEA (4 seeds each)")
    p.add_argument("--work", default=None, help="keep the table's images per concept and method in this folder and "
                   "resume from them (delete it when the runs change)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(run=evaluate_runs)

    p = tea.add_parser("findings", help="the TEA findings (i)-(iv) of docs/findings.md on the shipped runs, as a "
                       "markdown table (reads study.json and tea_table.json; no generation)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(run=findings)

    p = tea.add_parser("attention", help="where the learned token looks: leak and context shares over the shipped "
                       "Textual Inversion steps and with/without TEA (all methods), against ShapesWorld's regions",
                       description=doc("persviz.tea.attention_study"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", default=",".join(CONCEPT_NAMES))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--ti-steps", default=",".join(str(s) for s in range(0, 3001, ATTENTION_STEP_EVERY)),
                   help="Textual Inversion steps (0: the class word's row)")
    p.add_argument("--probes", type=int, default=24, help="prompts per concept (tea_table's; default 24)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    p.add_argument("--out", default=str(ATTENTION_STUDY_JSON))
    p.add_argument("--work", default=None, help="the cells' folder (default: OUT without .json, + '.cells')")
    add_grid_options(p, dino=False)
    p.set_defaults(batch_size=48)
    p.set_defaults(run=attention)


def runs(a: argparse.Namespace) -> None:
    """Trains (or resumes) the shipped runs; with --study / --table their study and the TEA table."""
    from persviz.families import assemble_pipeline
    from persviz.methods import get_method
    from persviz.tea import shapesworld_runs
    threads(a.threads)
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {METHODS}")
    pipe = assemble_pipeline()
    judges = shapesworld_runs.evaluators() if a.study or a.table else None
    for method in methods:
        for name in a.concepts.split(","):
            shapesworld_runs.RUNNERS[method](pipe, name)
            if a.study and get_method(method).row_snapshots:
                shapesworld_runs.study_textual_inversion(pipe, name, judges)
    if a.table:
        shapesworld_runs.tea_table(pipe, judges)


def evaluate_runs(a: argparse.Namespace) -> None:
    """Re-measures the shipped runs (no training): tea_table.json and adaptive_tea.json."""
    from persviz.families import assemble_pipeline
    from persviz.tea import shapesworld_runs
    threads(a.threads)
    what = [w for w in a.what.split(",") if w]
    unknown = sorted(set(what) - {"table", "adaptive"})
    if unknown:
        raise SystemExit(f"unknown --what {unknown}; choose from table, adaptive")
    missing = [str(shapesworld_runs.run_dir(m, n)) for m in METHODS for n in CONCEPT_NAMES
               if not shapesworld_runs.run_dir(m, n).is_dir()]
    if missing:
        raise SystemExit(f"no shipped run in {missing[0]}; train it with `persviz tea runs`")
    pipe, judges = assemble_pipeline(), shapesworld_runs.evaluators()
    if "table" in what:
        print("wrote", shapesworld_runs.tea_table(pipe, judges, n_probes=a.probes,
                                                        work=Path(a.work) if a.work else None) and
              shapesworld_runs.RUNS_DIR / "tea_table.json")
    if "adaptive" in what:
        print("wrote", shapesworld_runs.adaptive_table(pipe, judges, n_probes=a.adaptive_probes) and
              shapesworld_runs.RUNS_DIR / "adaptive_tea.json")


def findings(a: argparse.Namespace) -> None:
    """Prints the registered findings' table of the shipped runs."""
    from persviz.families import assemble_pipeline
    from persviz.tea.findings import findings_markdown, shipped_findings
    threads(a.threads)
    print(findings_markdown(shipped_findings(assemble_pipeline())))


def attention(a: argparse.Namespace) -> Any:
    """The attention study over the asked steps, methods and concepts (sharded): --out (the main process)."""
    if relaunch(a) is not None:  # before the imports: the launching process only waits
        return None
    from persviz.concept_folder import check_method
    from persviz.constants import SHAPESWORLD
    from persviz.tea import attention_study, concept_study
    threads(a.threads)
    methods = [check_method(m) for m in a.methods.split(",") if m]
    try:
        ti_steps = [int(s) for s in a.ti_steps.split(",") if s]
    except ValueError:
        raise SystemExit(f"--ti-steps takes comma-separated integers, e.g. 0,300,3000; got {a.ti_steps!r}")
    state, pipe, _, _, oracle = grid_models(a, SHAPESWORLD, judges=("oracle",))
    gen = concept_study.StudySettings(steps=a.steps, guidance=a.guidance, batch_size=a.batch_size).generation(True)
    out = Path(a.out)
    study = attention_study.run_attention_study(
        pipe, oracle, a.work or out.with_suffix(".cells"), out, [c for c in a.concepts.split(",") if c], ti_steps,
        methods, a.probes, a.seeds, gen["guidance"], gen["steps"], gen["batch_size"], state=state,
        progress=not a.no_progress)
    if study is not None:
        print(f"wrote {out}: {len(study['all']['intervals'])} conditions ({state.num_processes} process(es))")
    return study
