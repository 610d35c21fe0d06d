"""The test-time fixes side by side: ``persviz repair CONCEPT_DIR [--step k] [--write]`` (issue 26, docs/pick.md §5).

On one checkpoint of each run of a concept folder (default: the final weights), every fix that applies to the
method with its knob swept, on the picker's probes and seeds (24 contextual probes, image i seeded 1000 + i, the
same images for every condition): TEA at the token level (Eq. 1; the methods that learn a token row), TEA at the
prompt level (Eq. 2, aligned; every method), a norm-only rescale (Eq. 1 with rotation 0; at the token level where
the method learns a row, else at the prompt level) and adaptive TEA (docs/tea.md §7, per probe; token level).
AdaptSP (arXiv 2605.07257) is left out: its method section was not reachable, and the abstract fits opposite
readings (docs/pick.md §5).

Each condition is scored per image and compared with no fix as paired differences with the protocol's intervals:
context gained (oracle context rate, CLIP-T of the context) and identity lost (oracle concept rate, CLIP-I,
DINO-I). Each judge ranks the fixes by context difference + identity difference at each fix's best knob.
``--write`` writes the first-ranked fix that a file can hold (a token-level one: TEA or the rescale at its knob)
into a new embedding file of the run's format, as ``persviz fix``. OUT/repair/repair.json, OUT/repair/<method>.png
(the trade-off per fix); cells in OUT/repair/cells/ (resumable, sharded).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from persviz import __version__
from persviz.concept_folder import Concept
from persviz.evaluation import Evaluation, describe_evaluator, evaluate
from persviz.families.base import Pipeline
from persviz.generation import generate, generate_from_embeds
from persviz.io import atomic_write, confined, write_json
from persviz.loading import is_embedded
from persviz.methods import get_method
from persviz.plots import figure_and_ax
from persviz.shards import cell, run_cells
from persviz.stats import N_BOOT
from persviz.tea.adaptive import SCHEDULE, adaptive_tea, make_tea_scorer
from persviz.tea.concept_study import StudySettings
from persviz.tea.fix_file import fix_embedding
from persviz.tea.pick import GENERATION_SEED, N_PROBES, CheckpointSetup, checkpoints, grid_setup
from persviz.tea.pick_rules import PickError
from persviz.tea.pipeline import embeds_kwargs, encode_prompt_level, tea
from persviz.tea.study import generate_probes, probe_texts

REPAIR_DIR = "repair"
SCALE = 0.5  # the paper's scale knob for the rotation sweeps
NONE = "no fix"
CONTEXT = {"oracle": "oracle_context", "clip": "clip_t_context"}
IDENTITY = {"oracle": "oracle_concept", "clip": "clip_i"}
COMPARED = ("oracle_context", "clip_t_context", "oracle_concept", "clip_i", "dino_i")


@dataclass(frozen=True)
class Fix:
    """A test-time fix: its name, where it acts ('token', 'prompt', 'adaptive') and its knob values."""

    name: str
    level: str
    knob: str
    values: tuple[float, ...]

    def applies(self, method: str) -> bool:
        m = get_method(method)
        return self.level == "prompt" or (m.learns_token and m.tea_level == "token")

    def label(self, value: float) -> str:
        return f"{self.name} {self.knob} {value:g}"


FIXES = (Fix("TEA token", "token", "rotation", (0.1, 0.2, 0.4)),
         Fix("TEA prompt", "prompt", "rotation", (0.1, 0.2, 0.4)),
         Fix("rescale", "rescale", "scale", (0.5, 1.0)),
         Fix("adaptive TEA", "adaptive", "target", (0.9, 1.0)))


def fixes_for(method: str) -> list[Fix]:
    """The fixes that apply to a method's runs; the rescale acts on the token where the method learns one."""
    return [f for f in FIXES if f.level in ("prompt", "rescale") or f.applies(method)]


def _token_level(method: str) -> bool:
    m = get_method(method)
    return bool(m.learns_token and m.tea_level == "token")


class Repairer:
    """The images of each condition on one loaded checkpoint."""

    def __init__(self, setup: CheckpointSetup, method: str, path: Path):
        self.s, self.method, self.path = setup, method, path
        self.token = setup.concept.token(method)
        self.word = setup.word(method)
        self.cw = setup.concept.class_word
        self._adaptive: dict[tuple[int, float], np.ndarray] = {}

    def _generate(self) -> np.ndarray:
        return generate_probes(self.s.pipe, self.s.probes, self.word, 1, GENERATION_SEED, **self.s.generation)

    def _prompt_level(self, rotation: float, scale: float) -> np.ndarray:
        personal, plain = probe_texts(self.s.probes, self.word), probe_texts(self.s.probes, self.cw)
        embeds = encode_prompt_level(self.s.pipe, personal, plain, rotation, scale, aligned=True,
                                     placeholder=self.token, class_word=self.cw)
        return generate_from_embeds(self.s.pipe, **embeds_kwargs(embeds), seed=GENERATION_SEED, **self.s.generation)

    def images(self, fix: Optional[Fix], value: Optional[float]) -> np.ndarray:
        with self.s.at(self.method, self.path):
            if fix is None:
                return self._generate()
            if fix.level == "prompt" or (fix.level == "rescale" and not _token_level(self.method)):
                r, s = (value, SCALE) if fix.level == "prompt" else (0.0, value)
                return self._prompt_level(r, s)
            if fix.level in ("token", "rescale"):
                r, s = (value, SCALE) if fix.level == "token" else (0.0, value)
                with tea(self.s.pipe, self.token, self.cw, rotation=r, scale=s, method=self.method):
                    return self._generate()
            return self._adaptive_images(value)

    def _adaptive_images(self, target_frac: float, floor_frac: float = 0.9) -> np.ndarray:
        """Per probe: adaptive TEA's rotation (context CLIP-T of the class-word prompt x target_frac as the target,
        0.9 x CLIP-I at rotation 0 as the floor, scale 0.5), its image seeded as the probe's image of no fix."""
        out = []
        gen = {k: v for k, v in self.s.generation.items() if k in ("steps", "guidance")}
        for i, p in enumerate(self.s.probes):
            prompt, seed = p["template"].format(self.word), GENERATION_SEED + i
            sc = make_tea_scorer(self.s.pipe, prompt, self.token, self.cw, self.s.clip, self.s.refs,
                                 p["context_text"], n_images=1, seed=seed, method=self.method, **gen)
            cache = self._adaptive

            def generate_fn(rotation: float, scale: float, i: int = i, sc: Any = sc) -> np.ndarray:
                key = (i, round(float(rotation), 6))
                if key not in cache:
                    cache[key] = sc.generate(rotation, scale)
                return cache[key]
            if (i, "target") not in cache:
                base = generate(self.s.pipe, [p["template"].format(self.cw)], seed=seed, **gen)
                cache[(i, "target")] = sc.score(base)[0]
            fid0 = sc.score(generate_fn(0.0, SCALE))[1]
            res = adaptive_tea(generate_fn, sc.score, SCHEDULE, target=target_frac * cache[(i, "target")],
                               floor=floor_frac * fid0, scale=SCALE, method=self.method)
            out.append(generate_fn(res.rotation if res.rotation is not None else 0.0, SCALE))
        return np.concatenate(out)


def checkpoint_at(concept: Concept, method: str, step: Optional[int]) -> tuple[int, Path]:
    """(step, path) of the checkpoint to repair: `step`, or the last."""
    ckpts = checkpoints(concept, method, every=1)
    if step is None:
        return ckpts[-1]
    for k, p in ckpts:
        if k == step:
            return k, p
    raise PickError(f"the {method} run has no checkpoint at step {step}; it has {[k for k, _ in ckpts]}")


def _rank(ev: Evaluation, conditions: Mapping[str, tuple[Fix, float]], judge: str) -> list[dict[str, Any]]:
    """Per fix its best knob by the judge's context + identity difference against no fix, best fix first."""
    ctx, ident = CONTEXT[judge], IDENTITY[judge]
    best: dict[str, dict[str, Any]] = {}
    for cond, (fix, value) in conditions.items():
        d = ev.compare(NONE, cond, metrics=[ctx, ident], n_boot=N_BOOT)
        score = d[ctx].mean + d[ident].mean
        if fix.name not in best or score > best[fix.name]["score"]:
            best[fix.name] = {"fix": fix.name, "knob": fix.knob, "value": value, "condition": cond, "score": score}
    return sorted(best.values(), key=lambda r: -r["score"])


def analyse(ev: Evaluation, conditions: Mapping[str, tuple[Fix, float]], oracle: bool) -> dict[str, Any]:
    """Paired differences of every condition against no fix (with intervals), and each judge's ranking."""
    metrics = [m for m in COMPARED if m in ev.metrics(NONE)]
    diffs = {cond: {m: d.to_json() for m, d in ev.compare(NONE, cond, metrics=metrics).items()}
             for cond in conditions}
    judges = ["clip"] + (["oracle"] if oracle else [])
    return {"differences": diffs, "ranking": {j: _rank(ev, conditions, j) for j in judges}}


def pooled(results: Sequence[Mapping[str, Any]], oracle: bool = True) -> dict[str, Any]:
    """Every run of several repair results pooled as (run, probe) units, per condition over the runs it applies to:
    the paired differences against no fix and each judge's ranking (docs/pick.md §5)."""
    items: dict[str, dict[str, list]] = {}
    conds: dict[str, tuple[Fix, float]] = {}
    by_name = {f.name: f for f in FIXES}
    for res in results:
        for m, r in res["methods"].items():
            ev = Evaluation.from_json(r["evaluation"])
            unit = f"{res['concept']['name']}/{m}"
            for cond in ev.conditions:
                for name, fix in by_name.items():
                    if cond != NONE and cond.startswith(name + " " + fix.knob + " "):
                        conds[cond] = (fix, float(cond.rsplit(" ", 1)[1]))
            for cond in ev.conditions:
                src = ev.items[cond]
                # a condition pairs with no fix only over the runs that have it: each pooled pair is its own table
                dst = items.setdefault(cond, {k: [] for k in src})
                for k in src:
                    dst.setdefault(k, [])
                    dst[k] += [f"{unit}|{x}" for x in src[k]] if k == "prompt" else list(src[k])
    out: dict[str, Any] = {"differences": {}, "ranking": {}}
    pair_ev = {}
    for cond in conds:
        keep = {p.split("|")[0] for p in items[cond]["prompt"]}
        none = {k: [v for v, p in zip(items[NONE][k], items[NONE]["prompt"]) if p.split("|")[0] in keep]
                for k in items[NONE]}
        pair_ev[cond] = Evaluation({NONE: none, cond: items[cond]})
        metrics = [m for m in COMPARED if m in pair_ev[cond].metrics()]
        out["differences"][cond] = {m: d.to_json() for m, d in pair_ev[cond].compare(NONE, cond, metrics=metrics).items()}
        out["differences"][cond]["runs"] = sorted(keep)
    for judge in ["clip"] + (["oracle"] if oracle else []):
        best: dict[str, dict[str, Any]] = {}
        for cond, (fix, value) in conds.items():
            d = out["differences"][cond]
            score = d[CONTEXT[judge]]["mean"] + d[IDENTITY[judge]]["mean"]
            if fix.name not in best or score > best[fix.name]["score"]:
                best[fix.name] = {"fix": fix.name, "knob": fix.knob, "value": value, "condition": cond,
                                  "score": score}
        out["ranking"][judge] = sorted(best.values(), key=lambda r: -r["score"])
    return out


def tradeoff_plot(differences: Mapping[str, Mapping[str, Any]], judge: str = "oracle", ax: Optional[Axes] = None,
                  title: Optional[str] = None) -> Figure:
    """Identity difference (x) against context difference (y) per condition against no fix, with interval
    crosses; one line per fix through its knob values; the origin is no fix."""
    ctx, ident = CONTEXT[judge], IDENTITY[judge]
    fig, ax = figure_and_ax(ax, (4.6, 3.8))
    groups: dict[str, list[tuple[float, str, Mapping]]] = {}
    for cond, d in differences.items():
        if ctx not in d:
            raise PickError(f"the differences have no {ctx}; score with the {judge} judge first")
        name, value = cond.rsplit(" ", 1)
        groups.setdefault(name, []).append((float(value), cond, d))
    for k, (name, rows) in enumerate(sorted(groups.items())):
        rows.sort()
        x = np.array([r[2][ident]["mean"] for r in rows])
        y = np.array([r[2][ctx]["mean"] for r in rows])
        xe = np.array([[r[2][ident]["mean"] - r[2][ident]["low"] for r in rows],
                       [r[2][ident]["high"] - r[2][ident]["mean"] for r in rows]])
        ye = np.array([[r[2][ctx]["mean"] - r[2][ctx]["low"] for r in rows],
                       [r[2][ctx]["high"] - r[2][ctx]["mean"] for r in rows]])
        color = f"C{k}"
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o-", color=color, ms=4, lw=1, elinewidth=0.6, alpha=0.9,
                    label=name)
        for (v, _, _), xi, yi in zip(rows, x, y):
            ax.annotate(f"{v:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6, color=color)
    ax.axhline(0, color="0.6", lw=0.7)
    ax.axvline(0, color="0.6", lw=0.7)
    ax.set_xlabel(f"identity change ({ident})", fontsize=8)
    ax.set_ylabel(f"context change ({ctx})", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(title or f"fixes against no fix: {judge}", fontsize=9)
    return fig


def repair(folder: Any, pipe: Pipeline, clip: Any, dino: Any = None, oracle: Any = None,
           methods: Optional[Sequence[str]] = None, step: Optional[int] = None, out: Any = None,
           n_probes: int = N_PROBES, settings: Optional[StudySettings] = None, write: bool = False,
           progress: bool = True, state: Any = None) -> Optional[dict[str, Any]]:
    """The fixes side by side on one checkpoint of each run: OUT/repair/repair.json and a trade-off figure per
    method; with write, the first-ranked token-level fix as a file of the run's format in OUT/repair/."""
    concept, names, where, setup = grid_setup(folder, pipe, clip, dino, oracle, methods, out, n_probes, settings)
    rdir = where / REPAIR_DIR
    at = {m: checkpoint_at(concept, m, step) for m in names}
    plan = {m: [(None, None)] + [(f, v) for f in fixes_for(m) for v in f.values] for m in names}
    cells = [cell(method=m, condition=NONE if f is None else f.label(v)) for m in names for f, v in plan[m]]
    lookup = {(m, NONE if f is None else f.label(v)): (f, v) for m in names for f, v in plan[m]}
    seeds = [GENERATION_SEED + i for i in range(len(setup.probes))]
    repairers = {m: Repairer(setup, m, at[m][1]) for m in names}  # one per run: adaptive TEA's images are shared

    def compute(c: dict) -> dict:
        m, cond = c["method"], c["condition"]
        fix, value = lookup[(m, cond)]
        images = repairers[m].images(fix, value)
        ev = evaluate({cond: images}, setup.probes, concept.class_word, setup.refs, clip, dino, oracle,
                      setup.signature, 1, seeds=seeds, concept=concept.name or None,
                      scale="shapesworld" if is_embedded(concept.model) else "full")
        return {"items": ev.items[cond], "meta": ev.meta}

    grid = {"concept": concept.name or str(concept.folder), "model": concept.model, "probes": n_probes,
            "generation_seed": GENERATION_SEED, "steps_repaired": {m: at[m][0] for m in names}, **setup.generation,
            "judges": [describe_evaluator(j) for j in (clip, dino, oracle)]}
    with confined(where):
        results = run_cells(cells, compute, rdir, grid, state=state, progress=progress, desc="repair")
        if results is None:
            return None
        out_d: dict[str, Any] = {"format": "persviz repair 1", "concept": concept.to_json(), "settings": grid,
                                 "methods": {}, "figures": [], "written": {}}
        for m in names:
            items = {c["condition"]: results[c["id"]]["items"] for c in cells if c["method"] == m}
            meta = results[cell(method=m, condition=NONE)["id"]]["meta"]
            ev = Evaluation(items, meta)
            conds = {cond: lookup[(m, cond)] for cond in items if cond != NONE}
            res = analyse(ev, conds, oracle is not None)
            out_d["methods"][m] = {"step": at[m][0], **res, "evaluation": ev.to_json()}
            fig = Figure(figsize=(9.2 if oracle is not None else 4.6, 3.8), layout="constrained")
            for k, judge in enumerate(["clip"] + (["oracle"] if oracle is not None else [])):
                tradeoff_plot(res["differences"], judge, ax=fig.add_subplot(1, 2 if oracle is not None else 1, k + 1),
                              title=f"{m} step {at[m][0]}: {judge}")
            png = atomic_write(rdir / f"{m}_fixes.png", lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=120,
                                                                                      bbox_inches="tight"))
            side = write_json(rdir / f"{m}_fixes.json", {"figure": f"{m}_fixes", "persviz": __version__,
                                                          "method": m, "settings": grid, "command": "persviz repair"})
            out_d["figures"] += [str(png), str(side)]
            if write:
                out_d["written"][m] = write_fix(concept, m, at[m], res["ranking"]["oracle" if oracle is not None
                                                                                   else "clip"], pipe, rdir)
        write_json(rdir / "repair.json", out_d)
    return out_d


def write_fix(concept: Concept, method: str, checkpoint: tuple[int, Path], ranking: Sequence[Mapping[str, Any]],
              pipe: Pipeline, folder: Path) -> dict[str, Any]:
    """The first-ranked fix a file can hold (token-level TEA or the token rescale) baked into a new file of the
    run's format (persviz.tea.fix_file); a sentence why not otherwise."""
    if not _token_level(method):
        return {"written": None, "why": f"{method} is fixed at the prompt level, which no weights file holds; apply "
                                        "it at generation (persviz.tea.pipeline.encode_prompt_level)"}
    for r in ranking:
        if r["fix"] in ("TEA token", "rescale"):
            rot, scale = (r["value"], SCALE) if r["fix"] == "TEA token" else (0.0, r["value"])
            step, path = checkpoint
            src = path if path.is_file() else _token_file(path)
            new = folder / f"{method}_step{step}_fixed{src.suffix}"
            res = fix_embedding(src, pipe, concept.class_word, new, rotation=rot, scale=scale, method=method,
                                force=True)
            return {"written": str(res.path) if hasattr(res, "path") else str(new), "fix": r["fix"], "rotation": rot,
                    "scale": scale, "from": str(src)}
    return {"written": None, "why": "no token-level fix was ranked"}


def _token_file(folder: Path) -> Path:
    """The token's embedding file in a run or checkpoint folder (Custom Diffusion's learned_embeds)."""
    found = sorted(Path(folder).glob("learned_embeds*.safetensors")) + sorted(Path(folder).glob("*.bin"))
    if not found:
        raise PickError(f"{folder} holds no token file (learned_embeds.safetensors); pass the run's folder")
    return found[0]


def repair_text(result: Mapping[str, Any]) -> str:
    """What ``persviz repair`` prints: each judge's ranking per method and each condition's differences."""
    lines = []
    for m, r in result["methods"].items():
        lines.append(f"{m} at step {r['step']}:")
        for cond, d in r["differences"].items():
            parts = [f"{k} {v['mean']:+.3g} [{v['low']:+.3g}, {v['high']:+.3g}]" for k, v in d.items()
                     if isinstance(v, Mapping)]
            lines.append(f"  {cond}: " + "; ".join(parts))
        for judge, rank in r["ranking"].items():
            lines.append(f"  {judge} ranks: " + ", ".join(f"{x['fix']} ({x['knob']} {x['value']:g}, {x['score']:+.3g})"
                                                          for x in rank))
        w = result.get("written", {}).get(m)
        if w:
            lines.append(f"  written: {w.get('written') or w.get('why')}")
    return "\n".join(lines)


__all__ = ["FIXES", "Fix", "REPAIR_DIR", "Repairer", "analyse", "checkpoint_at", "fixes_for", "pooled", "repair", "repair_text",
           "tradeoff_plot", "write_fix"]
