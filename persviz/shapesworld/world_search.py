"""The recipe search of issue 23, pre-registered in docs/world.md: for each method, the learning rate and number of
steps under which the oracle finds the world concepts (persviz.shapesworld.world_concepts) in images of plain
prompts, chosen on selection seeds and then measured on held-out seeds.

    python -m persviz.shapesworld.world_search --threads 1     # runs the search, or resumes it where it stopped
    python -m persviz.shapesworld.world_search --status        # what is done, what is left, the results so far
    python -m persviz.shapesworld.world_search --checks --screen   # rewrite the concept checks (docs/world.md §2)

Everything goes into one folder (default data/cache/world_search/, gitignored) and every piece is resumable:
``runs/<method>/<concept>/lr<lr>/`` holds a trainer's run (which resumes exactly, persviz.trainers), one run per
(method, concept, lr) trained to the largest step of the grid and evaluated at every step of the grid from its
snapshots (the learning rate is constant, so the step-k snapshot is the k-step run); ``cells/<key>.json`` holds one
evaluation (plain prompts x seeds, every image's hit kept); ``selected/<method>.json`` the selection. A finished cell
is never computed again.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from persviz.generation import STEPS
from persviz.io import write_json
from persviz.loading import load_evaluator, load_pipeline
from persviz.methods import get_method
from persviz.paths import DATA_DIR
from persviz.shapesworld.concept_checks import (PLAIN_TEMPLATES, RECIPE_KEYS, closest_object, finds, plain_prompts,
                                                prompt_readings, summarize_rate)
from persviz.shapesworld.world_concepts import (WORLD_CONCEPTS, get_world_concept, measure_world_concepts,
                                                render_world_references, screen_world, world_recipe)
from persviz.trainers import (METHODS, list_custom_diffusion_snapshots, list_lora_snapshots, list_snapshots,
                              train_custom_diffusion, train_dreambooth_lora, train_textual_inversion)
from persviz.trainers.recipes import DREAMBOOTH_IDENTIFIER, recipe

SEARCH_DIR = DATA_DIR / "cache" / "world_search"
CHECKS_DIR = DATA_DIR / "shapesworld" / "world"  # the checks of docs/world.md §2: concept_checks.json, screen.json
SELECTION_SEEDS = tuple(range(1000, 1008))
HELD_OUT_SEEDS = tuple(range(2000, 2008))
ROUND2_SEEDS = tuple(range(4000, 4008))  # round 2's held-out seeds (docs/world.md §6), unused before it
TARGET_RATE, TARGET_LOW = 0.8, 0.7
TRAINERS = {"textual_inversion": train_textual_inversion, "dreambooth": train_dreambooth_lora,
            "custom_diffusion": train_custom_diffusion}
SNAPSHOTS = {"textual_inversion": list_snapshots, "dreambooth": list_lora_snapshots,
             "custom_diffusion": list_custom_diffusion_snapshots}


@dataclass(frozen=True)
class MethodGrid:
    """One method's grid: learning rates x evaluated steps; `overrides` go to the recipe as they are."""

    lrs: tuple[float, ...]
    steps: tuple[int, ...]
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lrs or not self.steps or min(self.lrs) <= 0 or min(self.steps) < 1:
            raise ValueError(f"a grid needs learning rates > 0 and steps >= 1; got {self.lrs}, {self.steps}")


#: The pre-registered grid (docs/world.md): around each method's ShapesWorld recipe (persviz.trainers.recipes); the
#: learning rates are run in this order (the shipped recipe's first), which does not enter the selection rule.
GRID = {
    "textual_inversion": MethodGrid((1e-3, 5e-4, 3e-3), (1000, 3000)),
    "dreambooth": MethodGrid((1e-3, 3e-4, 3e-3), (400, 800)),
    "custom_diffusion": MethodGrid((1e-4, 3e-5, 3e-4), (500, 1000)),
}


def method_token(method: str, name: str) -> str:
    """The token a method learns for a concept: '<candy>', 'sks', '<candy-cd>'."""
    return {"textual_inversion": f"<{name}>", "dreambooth": DREAMBOOTH_IDENTIFIER,
            "custom_diffusion": f"<{name}-cd>"}[check_method(method)]


def slot_word(method: str, name: str) -> str:
    """What fills a plain prompt's slot for a method's run: '<candy>', 'sks circle', '<candy-cd> circle'."""
    token, cw = method_token(method, name), get_world_concept(name).class_word
    return get_method(method).slot_word(token, cw)


def check_method(method: str) -> str:
    """The method name, or a ValueError listing them."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return method


def run_config(method: str, name: str, lr: float, steps: int, overrides: Optional[dict] = None,
               save_every: int = 100) -> Any:
    """The trainer config of one search run: ShapesWorld's recipe with the grid's lr and steps (snapshots every
    `save_every` steps: the grid's steps must be multiples of it)."""
    return recipe(method, method_token(method, name), get_world_concept(name).class_word, shapesworld=True, lr=lr,
                  steps=steps, save_every=save_every, **(overrides or {}))


def run_folder(out: Path, method: str, name: str, lr: float) -> Path:
    """Where a search run lives: out/runs/<method>/<concept>/lr<lr>."""
    return Path(out) / "runs" / method / name / f"lr{lr:g}"


def cell_key(method: str, name: str, lr: float, step: int, seed_set: str) -> str:
    """The file name (without .json) of one evaluation: 'textual_inversion__candy__lr0.001__step1000__selection'."""
    return f"{method}__{name}__lr{lr:g}__step{step}__{seed_set}"


def snapshot_at(method: str, run_dir: Path, step: int) -> Path:
    """The saved snapshot of a run at `step` (a FileNotFoundError if the run has none there)."""
    for k, p in SNAPSHOTS[check_method(method)](run_dir):
        if k == step:
            return p
    raise FileNotFoundError(f"{run_dir} holds no snapshot at step {step}; train the run to that step first")


def loaded(pipe: Any, method: str, path: Path) -> contextlib.AbstractContextManager[None]:
    """The pipeline with one snapshot of a run loaded, undone exactly on exit: the method's own load and undo
    (persviz.methods; it also puts back the text encoder's config.vocab_size that diffusers' unload leaves grown)."""
    return get_method(method).loaded(pipe, path)


def evaluate_snapshot(pipe: Any, oracle: Any, method: str, name: str, path: Path, seeds: Sequence[int],
                      templates: Sequence[str] = PLAIN_TEMPLATES, sample_steps: int = STEPS) -> dict:
    """The oracle's concept hits on the plain prompts x seeds with one snapshot loaded: {'prompts', 'hits', 'rate',
    'closest'} (closest: per image, [shape, color, texture, size] of the object nearest the recipe, or None)."""
    prompts, recipe = plain_prompts(slot_word(method, name), templates), world_recipe(name)
    with loaded(pipe, method, path):
        readings = prompt_readings(pipe, oracle, prompts, seeds, steps=sample_steps)
    hits = np.array([[finds(r, recipe) for r in row] for row in readings], dtype=bool)
    closest = [[None if (o := closest_object(r, recipe)) is None else [o[k] for k in RECIPE_KEYS] for r in row]
               for row in readings]
    return {"prompts": prompts, "hits": hits.astype(int).tolist(), "rate": summarize_rate(hits).to_json(),
            "closest": closest}


def misreadings(cells: Sequence[dict]) -> dict:
    """Over cells, how often the object nearest the recipe got each attribute wrong (per attribute: share of images
    whose closest object differs there; 'none': share with no object) and its most common reading."""
    rows = [c for cell in cells for row in cell.get("closest", []) for c in row]
    if not rows:
        return {}
    recipes = [cell["recipe"] for cell in cells for row in cell.get("closest", []) for _ in row]
    out = {"n": len(rows), "none": sum(r is None for r in rows) / len(rows)}
    for i, k in enumerate(RECIPE_KEYS):
        out[k] = sum(r is not None and r[i] != rc[k] for r, rc in zip(rows, recipes)) / len(rows)
    seen = Counter(" ".join(r[i] for i in (3, 1, 2, 0)) for r in rows if r is not None)
    out["most_common"] = seen.most_common(3)
    return out


RESULTS_JSON = CHECKS_DIR / "search_results.json"  # the search's cells and choices, shipped (export_results)


def read_cells(out: Path) -> list[dict]:
    """Every finished evaluation of the search: from its folder, or from a file export_results wrote."""
    out = Path(out)
    if out.suffix == ".json":
        return json.loads(out.read_text())["cells"]
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def export_results(out: Path = SEARCH_DIR, path: Path = RESULTS_JSON) -> Path:
    """Every cell (each image's hit and reading) and every choice of the search in one file, for the repository
    (the run folders stay in the gitignored search folder)."""
    out = Path(out)
    selected = {p.stem: json.loads(p.read_text()) for p in sorted((out / "selected").glob("*.json"))}
    return write_json(Path(path), {"format": "persviz world search 1", "cells": read_cells(out), "selected": selected})


def select(cells: Sequence[dict], method: str, grid: MethodGrid, concepts: Sequence[str]) -> Optional[dict]:
    """The pre-registered rule on the selection seeds: the (lr, step) with the highest mean rate over the concepts;
    ties go to the higher minimum over concepts, then fewer steps, then the smaller lr. None until every grid
    point has a selection cell for every concept."""
    rates: dict[tuple, dict] = {}
    for c in cells:
        if c["method"] == method and c["seed_set"] == "selection" and c["concept"] in concepts:
            rates.setdefault((c["lr"], c["step"]), {})[c["concept"]] = c["rate"]["rate"]
    points = [(lr, k) for lr in grid.lrs for k in grid.steps]
    if any(set(rates.get(p, {})) != set(concepts) for p in points):
        return None
    scored = [(round(float(np.mean(list(rates[p].values()))), 9), round(min(rates[p].values()), 9), p) for p in points]
    mean, low, (lr, step) = min(scored, key=lambda s: (-s[0], -s[1], s[2][1], s[2][0]))
    return {"method": method, "lr": lr, "step": step, "mean_rate": mean, "min_rate": low,
            "table": [{"lr": p[0], "step": p[1], "mean_rate": m, "min_rate": lo, "per_concept": rates[p]}
                      for m, lo, p in scored]}


def select_per_concept(cells: Sequence[dict], method: str, grid: MethodGrid, name: str) -> Optional[dict]:
    """Round 2's rule (docs/world.md §6), per (method, concept): the grid point with the highest selection rate for
    this concept; ties go to fewer steps, then the smaller lr. None until every grid point has its selection cell."""
    rates = {(c["lr"], c["step"]): c["rate"]["rate"] for c in cells
             if c["method"] == method and c["concept"] == name and c["seed_set"] == "selection"}
    points = [(lr, k) for lr in grid.lrs for k in grid.steps]
    if any(p not in rates for p in points):
        return None
    lr, step = min(points, key=lambda p: (-round(rates[p], 9), p[1], p[0]))
    return {"method": method, "concept": name, "lr": lr, "step": step, "selection_rate": rates[(lr, step)],
            "table": [{"lr": p[0], "step": p[1], "rate": rates[p]} for p in points]}


def run_round2(pipe: Any, oracle: Any, out: Path = SEARCH_DIR, methods: Sequence[str] = METHODS,
               concepts: Sequence[str] = tuple(WORLD_CONCEPTS), grid: Optional[dict] = None,
               seeds: Sequence[int] = ROUND2_SEEDS, templates: Sequence[str] = PLAIN_TEMPLATES,
               sample_steps: int = STEPS, log: Callable[[str], None] = print) -> list[dict]:
    """Round 2 (docs/world.md §6): per (method, concept), the grid point select_per_concept chooses on the round-1
    selection cells (no new training), measured on the round-2 held-out seeds; returns the choices."""
    grid, out, chosen = GRID if grid is None else grid, Path(out), []
    for method in methods:
        for name in concepts:
            pick = select_per_concept(read_cells(out), method, grid[check_method(method)], name)
            if pick is None:
                log(f"round 2: {method} {name} has selection cells missing; run the search first")
                continue
            write_json(out / "selected" / f"{method}__{name}__round2.json", pick)
            chosen.append(pick)
            if not (out / "cells" / f"{cell_key(method, name, pick['lr'], pick['step'], 'held_out2')}.json").exists():
                _write_cell(pipe, oracle, out, method, name, pick["lr"], pick["step"], "held_out2", seeds,
                            templates, sample_steps, run_folder(out, method, name, pick["lr"]), log, 0.0)
    return chosen


def run_search(pipe: Any, oracle: Any, out: Path = SEARCH_DIR, methods: Sequence[str] = METHODS,
               concepts: Sequence[str] = tuple(WORLD_CONCEPTS), grid: Optional[dict] = None,
               selection_seeds: Sequence[int] = SELECTION_SEEDS, held_out_seeds: Sequence[int] = HELD_OUT_SEEDS,
               templates: Sequence[str] = PLAIN_TEMPLATES, sample_steps: int = STEPS, progress: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the search, method by method: every grid run trained and evaluated on the selection seeds,
    then the selected (lr, step) evaluated on the held-out seeds. Returns search_status(out)."""
    grid = GRID if grid is None else grid
    out = Path(out)
    for method in methods:
        g = grid[check_method(method)]
        for lr in g.lrs:
            for name in concepts:
                rd = run_folder(out, method, name, lr)
                todo = [k for k in g.steps
                        if not (out / "cells" / f"{cell_key(method, name, lr, k, 'selection')}.json").exists()]
                if not todo:
                    continue
                cfg = run_config(method, name, lr, max(g.steps), g.overrides, math.gcd(100, *g.steps))
                t0 = time.time()
                TRAINERS[method](pipe, render_world_references(name), cfg, rd, progress=progress, load_result=False)
                trained = time.time() - t0
                log(f"{method} {name} lr {lr:g}: trained to step {max(g.steps)} in {trained:.0f} s (this call)")
                for k in todo:
                    _write_cell(pipe, oracle, out, method, name, lr, k, "selection", selection_seeds, templates,
                                sample_steps, rd, log, trained if k == todo[0] else 0.0)
        chosen = select(read_cells(out), method, g, concepts)
        if chosen is None:
            continue
        write_json(out / "selected" / f"{method}.json", chosen)
        log(f"{method}: selected lr {chosen['lr']:g}, step {chosen['step']} (mean selection rate "
            f"{chosen['mean_rate']:.3f})")
        for name in concepts:
            if not (out / "cells" / f"{cell_key(method, name, chosen['lr'], chosen['step'], 'held_out')}.json").exists():
                _write_cell(pipe, oracle, out, method, name, chosen["lr"], chosen["step"], "held_out",
                            held_out_seeds, templates, sample_steps, run_folder(out, method, name, chosen["lr"]),
                            log, 0.0)
    return search_status(out, methods, concepts, grid)


def _write_cell(pipe: Any, oracle: Any, out: Path, method: str, name: str, lr: float, step: int, seed_set: str,
                seeds: Sequence[int], templates: Sequence[str], sample_steps: int, rd: Path,
                log: Callable[[str], None], train_seconds: float) -> None:
    """Evaluate one snapshot and write its cell (hits per image, rate, timings)."""
    t0 = time.time()
    res = evaluate_snapshot(pipe, oracle, method, name, snapshot_at(method, rd, step), seeds, templates,
                            sample_steps)
    cell = {"method": method, "concept": name, "lr": lr, "step": step, "seed_set": seed_set,
            "seeds": list(map(int, seeds)), **res, "recipe": world_recipe(name),
            "seconds": {"evaluate": round(time.time() - t0, 1), "train_this_call": round(train_seconds, 1)}}
    write_json(Path(out) / "cells" / f"{cell_key(method, name, lr, step, seed_set)}.json", cell)
    r = cell["rate"]
    log(f"  {seed_set} {method} {name} lr {lr:g} step {step}: {r['rate']:.3f} ({r['k']}/{r['n']}), "
        f"low {r['low']:.3f}")


def search_status(out: Path = SEARCH_DIR, methods: Sequence[str] = METHODS,
                  concepts: Sequence[str] = tuple(WORLD_CONCEPTS), grid: Optional[dict] = None) -> dict:
    """What the search has done and what is left: {'done', 'left', 'selected', 'held_out'}; held-out results say
    whether each meets the target (rate >= 0.8 and lower bound >= 0.7)."""
    grid = GRID if grid is None else grid
    out = Path(out)
    have = {cell_key(c["method"], c["concept"], c["lr"], c["step"], c["seed_set"]): c for c in read_cells(out)}
    done, left, selected, held = [], [], {}, []
    for method in methods:
        g = grid[method]
        keys = [cell_key(method, n, lr, k, "selection") for lr in g.lrs for n in concepts for k in g.steps]
        sel_path = out / "selected" / f"{method}.json"
        if sel_path.exists():
            selected[method] = json.loads(sel_path.read_text())
            s = selected[method]
            keys += [cell_key(method, n, s["lr"], s["step"], "held_out") for n in concepts]
        else:
            keys += [f"{method}__{n}__<selected lr and step>__held_out" for n in concepts]
        for key in keys:
            (done if key in have else left).append(key)
        for key in keys:
            c = have.get(key)
            if c is not None and c["seed_set"] == "held_out":
                r = c["rate"]
                held.append({"method": method, "concept": c["concept"], "lr": c["lr"], "step": c["step"],
                             "rate": r["rate"], "low": r["low"], "k": r["k"], "n": r["n"],
                             "meets_target": r["rate"] >= TARGET_RATE and r["low"] >= TARGET_LOW})
    return {"done": done, "left": left, "selected": selected, "held_out": held}


def results_table(out: Path = SEARCH_DIR) -> list[dict]:
    """One row per finished cell, in the search's order: method, concept, lr, step, seed set, rate, k, n, both
    intervals' lower bounds and the low used for the target, and what the oracle read instead (misreadings)."""
    rows = []
    for c in read_cells(out):
        r = c["rate"]
        rows.append({"method": c["method"], "concept": c["concept"], "lr": c["lr"], "step": c["step"],
                     "seed_set": c["seed_set"], "rate": r["rate"], "k": r["k"], "n": r["n"],
                     "boot": [r["boot_low"], r["boot_high"]], "wilson": [r["wilson_low"], r["wilson_high"]],
                     "low": r["low"], "misread": misreadings([c])})
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda x: (order[x["method"]], x["seed_set"] != "selection", x["concept"], x["lr"],
                                       x["step"]))


def results_markdown(out: Path = SEARCH_DIR, methods: Sequence[str] = METHODS) -> str:
    """results_table (of `methods`) as a markdown table (docs/world.md §4): rate, k/n, both intervals, the shares of
    images whose nearest object has the wrong shape / color / texture / size, and the oracle's commonest reading."""
    lines = ["| method | concept | lr | step | seeds | rate | k/n | bootstrap | Wilson | wrong shape / color / texture "
             "/ size | most read |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in [r for r in results_table(out) if r["method"] in methods]:
        m = r["misread"]
        wrong = " / ".join(f"{m.get(k, 0):.2f}" for k in RECIPE_KEYS)
        top = m.get("most_common") or [("nothing", 0)]
        lines.append(f"| {r['method']} | {r['concept']} | {r['lr']:g} | {r['step']} | {r['seed_set']} | "
                     f"{r['rate']:.3f} | {r['k']}/{r['n']} | [{r['boot'][0]:.3f}, {r['boot'][1]:.3f}] | "
                     f"[{r['wilson'][0]:.3f}, {r['wilson'][1]:.3f}] | {wrong} | {top[0][0]} ({top[0][1]}) |")
    return "\n".join(lines)


def format_status(status: dict, out: Optional[Path] = None) -> str:
    """A short text of search_status (with `out`, every finished cell's rate and the oracle's commonest reading)."""
    lines = [f"{len(status['done'])} cells done, {len(status['left'])} left"]
    lines += [f"left: {k}" for k in status["left"]]
    for row in results_table(out) if out is not None else []:
        top = row["misread"].get("most_common") or [("nothing", 0)]
        lines.append(f"{row['seed_set']} {row['method']} {row['concept']} lr {row['lr']:g} step {row['step']}: "
                     f"{row['rate']:.3f} ({row['k']}/{row['n']}), low {row['low']:.3f}; most read: {top[0][0]} "
                     f"({top[0][1]})")
    for m, s in status["selected"].items():
        lines.append(f"selected {m}: lr {s['lr']:g}, step {s['step']} (mean selection rate {s['mean_rate']:.3f})")
    for h in status["held_out"]:
        lines.append(f"held out {h['method']} {h['concept']}: {h['rate']:.3f} ({h['k']}/{h['n']}), low "
                     f"{h['low']:.3f}: {'meets' if h['meets_target'] else 'misses'} the target")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The entry point: run or resume the search (or print its status) with the pre-registered settings."""
    ap = argparse.ArgumentParser(prog="python -m persviz.shapesworld.world_search", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=str(SEARCH_DIR), help="the search folder (default data/cache/world_search)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in the order to run them")
    ap.add_argument("--status", action="store_true", help="print what is done and what is left, and exit")
    ap.add_argument("--checks", action="store_true", help="rewrite data/shapesworld/world/concept_checks.json, exit")
    ap.add_argument("--screen", action="store_true", help="rewrite data/shapesworld/world/screen.json, and exit")
    ap.add_argument("--export", action="store_true", help=f"write the cells and choices to {RESULTS_JSON}, and exit")
    ap.add_argument("--round2", action="store_true", help="round 2 (docs/world.md §6): per (method, concept) choice "
                    "on the selection cells, measured on seeds 4000-4007, and exit")
    a = ap.parse_args(argv)
    methods = [check_method(m.strip()) for m in a.methods.split(",") if m.strip()]
    if a.status:
        print(format_status(search_status(Path(a.out), methods), Path(a.out)))
        return
    if a.export:
        print("wrote", export_results(Path(a.out)))
        return
    torch.set_num_threads(a.threads)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    oracle = load_evaluator(kind="oracle")
    if a.round2:
        run_round2(pipe, oracle, Path(a.out), methods, log=lambda s: print(s, flush=True))
        return
    if a.checks or a.screen:
        if a.checks:
            write_json(CHECKS_DIR / "concept_checks.json", measure_world_concepts(pipe, oracle))
        if a.screen:
            write_json(CHECKS_DIR / "screen.json", screen_world(pipe, oracle, progress=True))
        return
    write_json(Path(a.out) / "plan.json", {"grid": {m: asdict(g) for m, g in GRID.items()}, "methods": methods,
                                           "concepts": list(WORLD_CONCEPTS), "selection_seeds": SELECTION_SEEDS,
                                           "held_out_seeds": HELD_OUT_SEEDS, "templates": PLAIN_TEMPLATES,
                                           "sample_steps": STEPS, "target": [TARGET_RATE, TARGET_LOW]})
    status = run_search(pipe, oracle, Path(a.out), methods, log=lambda s: print(s, flush=True))
    print(format_status(status), flush=True)


if __name__ == "__main__":
    main()
