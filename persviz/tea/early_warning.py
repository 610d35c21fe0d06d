"""The early-warning experiment of docs/pick.md §4: does the text-space signal see collapse coming?

20 ShapesWorld Textual Inversion runs on <candy> (learning rates 1e-3, 3e-3, 1e-2, 3e-2 x training seeds 0-4,
400 steps, a snapshot every 50), each snapshot and step 0 (the class word's row) evaluated on the picker's probes
(24 contextual probes, one image each, image i seeded 1000 + i) with the oracle; per run the collapse step (the
first step whose oracle context interval lies wholly below step 0's) and the signal's predicted step (the first
snapshot whose |V*| lies beyond the vocabulary's 95th percentile of row norms); Spearman's rho over the runs with
a bootstrap interval, and the verdict.

    OMP_NUM_THREADS=1 nohup python -m persviz.tea.early_warning --threads 1 > /tmp/early_warning.log 2>&1 &
    python -m persviz.tea.early_warning --status        # runs and evaluations done, and the numbers so far
    python -m persviz.tea.early_warning --export        # data/shapesworld/pick/early_warning.json

Resumable at every level: a run resumes from its last snapshot (the trainer), a finished evaluation is a JSON file
in data/cache/early_warning/cells/ and is never recomputed.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from persviz.evaluation import score_per_image
from persviz.families import text_stack
from persviz.io import atomic_write_text, write_json
from persviz.loading import load_pipeline
from persviz.paths import DATA_DIR
from persviz.shapesworld.concepts import eval_prompts, load_references, oracle_signature
from persviz.stats import bootstrap_mean
from persviz.tea.inspect_file import TAIL, vocabulary
from persviz.tea.pick_rules import censored, collapse_step, predicted_step, spearman_interval, verdict
from persviz.tea.shapesworld_runs import evaluators
from persviz.tea.study import generate_probes, learned_embedding
from persviz.trainers import list_snapshots, load_snapshot_embedding, train_textual_inversion
from persviz.trainers.recipes import recipe

CONCEPT = "candy"
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = (0, 1, 2, 3, 4)
STEPS = 400
EVERY = 50
PAST = STEPS + EVERY  # a run with no collapse step, or no crossing: one snapshot past the last
N_PROBES, PROBE_SEED, GENERATION_SEED = 24, 1, 1000
FOLDER = DATA_DIR / "cache" / "early_warning"
RESULT = DATA_DIR / "shapesworld" / "pick" / "early_warning.json"
COS_BELOW = 0.5  # the descriptive second signal: the first snapshot with cos(V*, c) < 0.5


def run_name(lr: float, seed: int) -> str:
    return f"lr{lr:g}_seed{seed}"


def plan() -> list[dict[str, Any]]:
    """The 20 runs, learning rates outer, seeds inner."""
    return [{"name": run_name(lr, s), "lr": lr, "seed": s} for lr in LRS for s in SEEDS]


def row_signal(vector: torch.Tensor, class_row: torch.Tensor, vocab_norms: torch.Tensor) -> dict[str, Any]:
    """|V*|, its percentile among the vocabulary's row norms (share with a smaller norm, in %), |V*|/|c|, cos."""
    v, c = vector.double().reshape(-1), class_row.double().reshape(-1)
    if not bool(torch.isfinite(v).all()):
        return {"norm": None, "percentile": None, "ratio": None, "cosine": None, "nan": True}
    n = float(v.norm())
    return {"norm": n, "percentile": float(100.0 * (vocab_norms.double() < n).double().mean()),
            "ratio": n / float(c.norm()), "cosine": float(v @ c / (v.norm() * c.norm())), "nan": False}


def _cell(folder: Path, name: str) -> Path:
    return folder / "cells" / f"{name}.json"


def evaluate_images(pipe: Any, judges: Mapping[str, Any], word: str, vector: Optional[torch.Tensor]) -> dict:
    """The picker's probes for <candy> generated with `word` in the slot (the placeholder holding `vector`, or the
    class word when vector is None), every image scored (persviz.evaluation.score_per_image)."""
    probes = eval_prompts(CONCEPT, N_PROBES, seed=PROBE_SEED)
    if vector is None:
        images = generate_probes(pipe, probes, word, 1, seed=GENERATION_SEED)
    else:
        with learned_embedding(pipe, word, vector):
            images = generate_probes(pipe, probes, word, 1, seed=GENERATION_SEED)
    scores = score_per_image(images, probes, "circle", load_references(CONCEPT), judges["clip"], judges["dino"],
                             judges["oracle"], oracle_signature(judges["oracle"], CONCEPT))
    return {k: [float(x) for x in v] for k, v in scores.items()}


def run_experiment(folder: Path = FOLDER, progress: bool = True) -> None:
    """Train and evaluate whatever is missing (one process; resumable)."""
    pipe, judges = load_pipeline(), evaluators()
    text = text_stack(pipe).primary
    class_row = text.word_row("circle").detach().float().cpu()
    vocab_norms = vocabulary(text.tokenizer, text.encoder)[1].norm(dim=-1)

    def save(name: str, obj: dict) -> None:
        path = _cell(folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(obj))

    if not _cell(folder, "step0").is_file():
        save("step0", {"step": 0, **row_signal(class_row, class_row, vocab_norms),
                       "scores": evaluate_images(pipe, judges, "circle", None)})
    refs = load_references(CONCEPT)
    for r in tqdm(plan(), desc="early warning: runs", disable=not progress):
        out = folder / "runs" / r["name"]
        names = [f"{r['name']}_step{k}" for k in range(EVERY, STEPS + 1, EVERY)]
        if all(_cell(folder, n).is_file() for n in names):
            continue
        cfg = recipe("textual_inversion", "<candy>", "circle", shapesworld=True, lr=r["lr"], steps=STEPS,
                     save_every=EVERY, seed=r["seed"])
        try:
            train_textual_inversion(pipe, refs, cfg, out, progress=False, load_result=False)
        except (ValueError, RuntimeError) as err:  # recorded, counted in n (docs/pick.md §6)
            print(f"{r['name']}: training stopped: {err}", flush=True)
        for k, path in list_snapshots(out):
            name = f"{r['name']}_step{k}"
            if k % EVERY or k > STEPS or _cell(folder, name).is_file():
                continue
            vec = load_snapshot_embedding(path).reshape(-1).float()
            sig = row_signal(vec, class_row, vocab_norms)
            scores = None if sig["nan"] else evaluate_images(pipe, judges, "<candy>", vec)
            save(name, {"step": k, **sig, "scores": scores})


def _interval(values: list[float]) -> dict[str, float]:
    iv = bootstrap_mean([[v] for v in values])
    return {"mean": iv.mean, "low": iv.low, "high": iv.high}


def analyse(folder: Path = FOLDER) -> dict[str, Any]:
    """Per run: the oracle context interval per step, the collapse step, the predicted step; rho and the verdict
    over the runs finished so far."""
    step0_path = _cell(folder, "step0")
    if not step0_path.is_file():
        return {"runs": [], "done": 0, "planned": len(plan())}
    step0 = json.loads(step0_path.read_text())
    ctx0 = _interval(step0["scores"]["oracle_context"])
    runs = []
    for r in plan():
        cells = [_cell(folder, f"{r['name']}_step{k}") for k in range(EVERY, STEPS + 1, EVERY)]
        if not all(c.is_file() for c in cells):
            continue
        rows = [json.loads(c.read_text()) for c in cells]
        steps = [0] + [row["step"] for row in rows]
        # a NaN snapshot generates nothing usable: collapsed from there on (docs/pick.md §6)
        context = [ctx0] + [(_interval(row["scores"]["oracle_context"]) if row["scores"] is not None
                             else {"mean": 0.0, "low": 0.0, "high": 0.0}) for row in rows]
        identity = [_interval(step0["scores"]["oracle_concept"])] + [
            (_interval(row["scores"]["oracle_concept"]) if row["scores"] is not None else
             {"mean": 0.0, "low": 0.0, "high": 0.0}) for row in rows]
        percent = [step0["percentile"]] + [row["percentile"] for row in rows]
        cosines = [1.0] + [row["cosine"] for row in rows]
        col = collapse_step(steps, context)
        pred = predicted_step(steps, percent, TAIL)
        cos_pred = next((k for k, c in zip(steps, cosines) if k > 0 and (c is None or c < COS_BELOW)), None)
        runs.append({**r, "steps": steps, "context": context, "identity": identity, "percentile": percent,
                     "ratio": [1.0] + [row["ratio"] for row in rows], "cosine": cosines,
                     "collapse_step": col, "predicted_step": pred, "cos_predicted_step": cos_pred})
    out: dict[str, Any] = {"format": "persviz early warning 1", "concept": CONCEPT, "lrs": list(LRS),
                           "seeds": list(SEEDS), "steps": STEPS, "every": EVERY, "tail": TAIL, "past": PAST,
                           "probes": N_PROBES, "probe_seed": PROBE_SEED, "generation_seed": GENERATION_SEED,
                           "step0_context": ctx0, "planned": len(plan()), "done": len(runs), "runs": runs}
    if len(runs) >= 3:
        x = [censored(r["predicted_step"], PAST) for r in runs]
        y = [censored(r["collapse_step"], PAST) for r in runs]
        res = spearman_interval(x, y)
        n_col = sum(r["collapse_step"] is not None for r in runs)
        out["correlation"] = res
        out["verdict"] = verdict(res, n_col)
        xc = [censored(r["cos_predicted_step"], PAST) for r in runs]
        out["cos_correlation"] = spearman_interval(xc, y)  # descriptive, not tested
    return out


def status_text(result: Mapping[str, Any]) -> str:
    """A few lines: runs done, each run's collapse and predicted steps, rho and the verdict."""
    lines = [f"early warning: {result.get('done', 0)} of {result.get('planned')} runs evaluated"]
    for r in result.get("runs", []):
        lines.append(f"  {r['name']}: collapse {r['collapse_step']}, predicted {r['predicted_step']}, "
                     f"|V*|/|c| at {r['steps'][-1]} {r['ratio'][-1] if r['ratio'][-1] is not None else 'NaN'}")
    c = result.get("correlation")
    if c:
        v = result["verdict"]
        rho = "undefined (a side is constant)" if c["rho"] is None or c["rho"] != c["rho"] else \
            f"{c['rho']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
        lines.append(f"Spearman rho(predicted, collapse) over {c['n']} runs: {rho}; "
                     f"{'predicts' if v['predicts'] else 'does not predict'}: {v['why']}")
    return "\n".join(lines)


def read_result(path: Path = RESULT) -> Optional[dict[str, Any]]:
    """The shipped experiment's result, None when it was not exported."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m persviz.tea.early_warning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--folder", default=str(FOLDER))
    p.add_argument("--status", action="store_true", help="print what is done and the numbers so far")
    p.add_argument("--export", action="store_true", help=f"write the analysis to {RESULT}")
    a = p.parse_args(argv)
    folder = Path(a.folder)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not (a.status or a.export):
        run_experiment(folder)
    result = analyse(folder)
    print(status_text(result), flush=True)
    if a.export or not a.status:
        write_json(RESULT, result)
        print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["CONCEPT", "EVERY", "FOLDER", "LRS", "RESULT", "SEEDS", "STEPS", "analyse", "main", "plan", "read_result",
           "row_signal", "run_experiment", "status_text"]
