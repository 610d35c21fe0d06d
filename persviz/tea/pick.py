"""Which checkpoint to keep: ``persviz pick CONCEPT_DIR`` (issue 26; the protocol and the rule: docs/pick.md).

For every method's run of a concept folder, at step 0 (the base model with the class word) and each saved
checkpoint (Textual Inversion snapshots every ``every`` steps, DreamBooth-LoRA and Custom Diffusion checkpoints and
the final weights): identity and context on one fixed set of probes and seeds, scored per image and summarised with
the protocol's intervals, by CLIP (CLIP-I, CLIP-T of the context) and, on ShapesWorld, by the oracle; the text-space
signal (Textual Inversion: |V*|/|c|, cos(V*, c), |V*|'s percentile among the vocabulary's norms; every method: the
drift of the probes' hidden states against the base model's with the class word). Then the Pareto front, the
recommendation by the pre-registered rule (persviz.tea.pick_rules), the collapse step, a trade-off figure and image
strips at the recommended step beside the last.

Each checkpoint is a cell of persviz.shards (``pick/cells/``): a killed pick resumes, and ``--processes N`` shards it.
``--fast`` reads the signal alone (no image) and recommends only where the early-warning experiment
(persviz.tea.early_warning, docs/pick.md §4) found that the signal predicts collapse.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from persviz import __version__
from persviz.concept_folder import Concept, read_concept
from persviz.evaluation import describe_evaluator, score_per_image
from persviz.families import text_stack
from persviz.families.base import Pipeline
from persviz.io import atomic_write, confined, write_json
from persviz.loading import is_embedded
from persviz.methods import METHODS, get_method
from persviz.plots import figure_and_ax, image_grid
from persviz.shapesworld.concepts import reference_signature
from persviz.shards import cell, run_cells
from persviz.stats import bootstrap_mean
from persviz.tea.concept_study import StudySettings, probes_for
from persviz.tea.early_warning import read_result, row_signal
from persviz.tea.inspect_file import TAIL, vocabulary
from persviz.tea.pick_rules import PickError, collapse_step, mlh, pareto_front, predicted_step, recommend
from persviz.tea.study import generate_probes, learned_embedding, probe_texts
from persviz.trainers import load_snapshot_embedding

PICK_DIR = "pick"
EVERY = 300
N_PROBES, PROBE_SEED, GENERATION_SEED = 24, 1, 1000
STRIP = 6  # images per strip
#: identity and context of each judge
JUDGES = {"clip": ("clip_i", "clip_t_context"), "oracle": ("oracle_concept", "oracle_context")}
LABELS = {"clip_i": "identity: CLIP-I", "clip_t_context": "context: CLIP-T of the context part",
          "oracle_concept": "identity: oracle finds the concept", "oracle_context": "context: oracle reads it right"}
SUMMARY_METRICS = ("clip_i", "clip_t_context", "dino_i", "oracle_concept", "oracle_context")


# ----------------------------------------------------------------------------- checkpoints and signal


def final_step(run: Path) -> Optional[int]:
    """The steps a run's config.json records (its final weights' step), None when it records none."""
    cfg = Path(run) / "config.json"
    if Path(run).is_dir() and cfg.is_file():
        steps = json.loads(cfg.read_text()).get("steps")
        return int(steps) if isinstance(steps, int) else None
    return None


def checkpoints(concept: Concept, method: str, every: int = EVERY) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints picked from: a row-snapshot method's snapshots at multiples of `every` (and
    its last), the other methods' every checkpoint and the run's final weights (the run folder, at its config's
    steps)."""
    m = get_method(method)
    run = concept.run_dir(method)
    snaps = list(m.snapshots(run))
    if m.row_snapshots and snaps:
        last = snaps[-1][0]
        snaps = [(k, p) for k, p in snaps if k % every == 0 or k == last]
    final = final_step(run)
    if not m.row_snapshots and final is not None and final not in {k for k, _ in snaps}:
        snaps.append((final, run))
    if not snaps:
        raise PickError(f"the {method} run in {run} holds no checkpoint; train it with --save-every so that it "
                        "saves some, or pick from another method")
    return sorted(snaps)


def prompt_states(pipe: Pipeline, prompts: Sequence[str]) -> torch.Tensor:
    """The primary text encoder's last hidden states of the prompts, float64 [N, L, D] (padded to the
    tokenizer's maximum length, as the pipeline encodes them)."""
    text = text_stack(pipe).primary
    tok = text.tokenizer(list(prompts), padding="max_length", max_length=text.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text.encoder(tok.input_ids.to(text.encoder.device))[0].double().cpu()


def drift(states: torch.Tensor, base: torch.Tensor) -> float:
    """docs/pick.md §1: the mean over prompts of |H - H_base|_F / |H_base|_F."""
    if states.shape != base.shape:
        raise PickError(f"hidden states of shape {tuple(states.shape)} against {tuple(base.shape)}; encode the same "
                        "prompts with the same tokenizer")
    num = (states - base).flatten(1).norm(dim=1)
    return float((num / base.flatten(1).norm(dim=1)).mean())


class CheckpointSetup:
    """What every checkpoint of a pick shares: the probes, the references, the judges, the base states."""

    def __init__(self, pipe: Pipeline, concept: Concept, clip: Any, dino: Any, oracle: Any,
                 n_probes: int, generation: Mapping[str, Any]):
        self.pipe, self.concept, self.clip, self.dino, self.oracle = pipe, concept, clip, dino, oracle
        self.probes = probes_for(concept, n_probes, PROBE_SEED)
        self.refs = concept.reference_images()
        self.signature = reference_signature(oracle, self.refs) if oracle is not None else None
        self.generation = dict(generation)
        self.base_states = prompt_states(pipe, probe_texts(self.probes, concept.class_word))
        text = text_stack(pipe).primary
        self.class_row = text.word_row(concept.class_word).detach().float().cpu()
        self.vocab_norms = vocabulary(text.tokenizer, text.encoder)[1].norm(dim=-1)

    def word(self, method: Optional[str]) -> str:
        if method is None:
            return self.concept.class_word
        m = get_method(method)
        return m.slot_word(self.concept.token(method), self.concept.class_word)

    @contextlib.contextmanager
    def at(self, method: Optional[str], path: Optional[Path]) -> Any:
        """The pipeline with the checkpoint in place (step 0: as it is); yields the learned row or None."""
        if method is None:
            yield None
            return
        m = get_method(method)
        if m.row_snapshots:
            vec = load_snapshot_embedding(path).reshape(-1).float()
            if not bool(torch.isfinite(vec).all()):
                yield vec  # a NaN row cannot be loaded; the caller records it as broken
                return
            with learned_embedding(self.pipe, self.concept.token(method), vec):
                yield vec
            return
        with m.loaded(self.pipe, Path(path)):
            yield None

    def signal(self, method: Optional[str], path: Optional[Path], fast: bool = False) -> tuple[dict, Optional[dict]]:
        """(signal, per-image scores or None): without images when fast."""
        word = self.word(method)
        with self.at(method, path) as vec:
            broken = vec is not None and not bool(torch.isfinite(vec).all())
            sig: dict[str, Any] = {}
            if method is None or get_method(method).row_snapshots:
                sig.update(row_signal(self.class_row if vec is None else vec, self.class_row, self.vocab_norms))
            if broken:
                return {**sig, "drift": None}, None
            sig["drift"] = drift(prompt_states(self.pipe, probe_texts(self.probes, word)), self.base_states)
            if fast:
                return sig, None
            images = generate_probes(self.pipe, self.probes, word, 1, GENERATION_SEED, **self.generation)
        scores = score_per_image(images, self.probes, self.concept.class_word, self.refs, self.clip, self.dino,
                                 self.oracle, self.signature)
        return sig, {k: [float(x) for x in v] for k, v in scores.items()}

    def images(self, method: Optional[str], path: Optional[Path], n: int = STRIP) -> np.ndarray:
        """The first n probes' images at a checkpoint (the same seeds as the grid: the same images)."""
        with self.at(method, path):
            return generate_probes(self.pipe, self.probes[:n], self.word(method), 1, GENERATION_SEED,
                                   **self.generation)


# ----------------------------------------------------------------------------- the summary


def _interval(values: Sequence[float]) -> dict[str, float]:
    iv = bootstrap_mean([[v] for v in values])
    return {"mean": iv.mean, "low": iv.low, "high": iv.high}


def summarize_method(method: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One run's picture from its rows (step 0 first; each {'step', 'signal', 'scores'}): intervals per metric,
    per judge the front and the recommendation, the collapse step (oracle when present, else CLIP), and whether
    CLIP's recommendation lies on the oracle's front."""
    ok = [r for r in rows if r["scores"] is not None]
    broken = [int(r["step"]) for r in rows if r["scores"] is None]
    steps = [int(r["step"]) for r in ok]
    metrics = [m for m in SUMMARY_METRICS if m in ok[0]["scores"]]
    intervals = {m: [_interval(r["scores"][m]) for r in ok] for m in metrics}
    out: dict[str, Any] = {"method": method, "steps": steps, "broken_steps": broken, "intervals": intervals,
                           "signal": {int(r["step"]): r["signal"] for r in rows}, "judges": {}}
    for judge, (ident, ctx) in JUDGES.items():
        if ident not in intervals:
            continue
        rec = recommend(steps, intervals[ident], intervals[ctx])
        front = pareto_front([i["mean"] for i in intervals[ident]], [c["mean"] for c in intervals[ctx]])
        out["judges"][judge] = {"identity": ident, "context": ctx, "recommendation": rec,
                                "front": [s for s, f in zip(steps, front) if f],
                                "collapse_step": collapse_step(steps, intervals[ctx])}
    j = out["judges"]
    out["collapse_step"] = (j.get("oracle") or j["clip"])["collapse_step"]
    if "oracle" in j:
        out["clip_pick_on_oracle_front"] = j["clip"]["recommendation"]["step"] in j["oracle"]["front"]
    return out


# ----------------------------------------------------------------------------- figures


def tradeoff_plot(summary: Mapping[str, Any], judge: str = "clip", ax: Optional[Axes] = None,
                  title: Optional[str] = None) -> Figure:
    """Identity against context, a point per step with its interval cross, the front joined, the recommended
    step ringed; on ShapesWorld the oracle's front is the same plot with judge='oracle'."""
    if judge not in summary.get("judges", {}):
        raise PickError(f"the summary has no {judge!r} scores; it has {sorted(summary.get('judges', {}))}")
    j = summary["judges"][judge]
    fig, ax = figure_and_ax(ax, (4.2, 3.6))
    steps = summary["steps"]
    ident = [mlh(i) for i in summary["intervals"][j["identity"]]]
    ctx = [mlh(c) for c in summary["intervals"][j["context"]]]
    x, y = np.array([i[0] for i in ident]), np.array([c[0] for c in ctx])
    xerr = np.array([[i[0] - i[1] for i in ident], [i[2] - i[0] for i in ident]])
    yerr = np.array([[c[0] - c[1] for c in ctx], [c[2] - c[0] for c in ctx]])
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.75", elinewidth=0.8, zorder=1)
    sc = ax.scatter(x, y, c=steps, cmap="viridis", s=28, zorder=3)
    fig.colorbar(sc, ax=ax, label="training step")
    on = [i for i, s in enumerate(steps) if s in j["front"]]
    on.sort(key=lambda i: x[i])
    ax.plot(x[on], y[on], "-", color="tab:red", lw=1.2, zorder=2, label="Pareto front")
    rec = steps.index(j["recommendation"]["step"])
    ax.scatter([x[rec]], [y[rec]], s=140, facecolors="none", edgecolors="black", lw=1.5, zorder=4,
               label=f"recommended: step {steps[rec]}")
    for i in (0, len(steps) - 1):
        ax.annotate(str(steps[i]), (x[i], y[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(LABELS.get(j["identity"], j["identity"]), fontsize=8)
    ax.set_ylabel(LABELS.get(j["context"], j["context"]), fontsize=8)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"{summary['method']}: {judge}", fontsize=9)
    return fig


def tradeoff_figure(summary: Mapping[str, Any]) -> Figure:
    """The trade-off by each judge the summary has, side by side (CLIP; the oracle on ShapesWorld)."""
    judges = list(summary["judges"])
    fig = Figure(figsize=(4.4 * len(judges), 3.8), layout="constrained")
    for k, judge in enumerate(judges):
        tradeoff_plot(summary, judge, ax=fig.add_subplot(1, len(judges), k + 1))
    return fig


def strip_plot(recommended: np.ndarray, last: np.ndarray, steps: tuple[int, int], ax: Optional[Axes] = None,
               title: Optional[str] = None) -> Figure:
    """Two rows of images on the same probes and seeds: the recommended step above, the last below."""
    if len(recommended) != len(last):
        raise PickError(f"{len(recommended)} images against {len(last)}; generate both strips on the same probes")
    return image_grid(np.concatenate([recommended, last]), 2, len(last),
                      row_labels=[f"step {steps[0]} (recommended)", f"step {steps[1]} (last)"], title=title, ax=ax)


def early_warning_plot(result: Mapping[str, Any], ax: Optional[Axes] = None) -> Figure:
    """The early-warning experiment: each run's predicted step (|V*| beyond the vocabulary's p95) against its
    collapse step; a step past the run's last ('none') is drawn at the right and top edge, slightly spread so that
    tied runs stay visible; the colour is the learning rate."""
    fig, ax = figure_and_ax(ax, (4.6, 3.8))
    runs = result.get("runs", [])
    if not runs:
        raise PickError("the early-warning result holds no finished run yet; run python -m persviz.tea.early_warning")
    past = result["past"]
    rng = np.random.default_rng(0)
    lrs = sorted({r["lr"] for r in runs})
    for k, lr in enumerate(lrs):
        mine = [r for r in runs if r["lr"] == lr]
        x = np.array([past if r["predicted_step"] is None else r["predicted_step"] for r in mine], float)
        y = np.array([past if r["collapse_step"] is None else r["collapse_step"] for r in mine], float)
        x += rng.uniform(-8, 8, len(x))
        y += rng.uniform(-8, 8, len(y))
        ax.scatter(x, y, s=22, color=f"C{k}", label=f"lr {lr:g}", alpha=0.85)
    ticks = list(range(0, past, result["every"] * 2)) + [past]
    for setter in (ax.set_xticks, ax.set_yticks):
        setter(ticks)
    ax.set_xticklabels([str(t) for t in ticks[:-1]] + ["none"], fontsize=7)
    ax.set_yticklabels([str(t) for t in ticks[:-1]] + ["none"], fontsize=7)
    ax.set_xlabel("predicted step (|V*| beyond the vocabulary's p95)", fontsize=8)
    ax.set_ylabel("collapse step (oracle context below step 0)", fontsize=8)
    c = result.get("correlation")
    rho = "" if not c or c["rho"] is None or c["rho"] != c["rho"] else \
        f": rho {c['rho']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"
    ax.set_title(f"early warning, {len(runs)} runs{rho}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _save_figure(fig: Figure, path: Path, record: Mapping[str, Any]) -> list[Path]:
    """The figure as PNG and its provenance beside it (what made it: persviz, the command, the settings)."""
    png = atomic_write(path.with_suffix(".png"), lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                                         bbox_inches="tight"))
    side = write_json(path.with_suffix(".json"), {"figure": path.stem, "persviz": __version__, **record})
    return [png, side]


# ----------------------------------------------------------------------------- the command


def methods_of(concept: Concept, methods: Optional[Sequence[str]]) -> list[str]:
    """The concept's runs to pick from (all of them by default), in the registry's order."""
    names = list(methods) if methods else [m for m in METHODS if m in concept.runs]
    for m in names:
        get_method(m)
        concept.run_dir(m)
    if not names:
        raise PickError(f"the concept in {concept.folder} has no run; train one with `persviz train` first")
    return names


def recommended_strips(pipe: Pipeline, concept: Concept, summary: Mapping[str, Any], generation: Mapping[str, Any],
                       method: str = "textual_inversion", judge: str = "clip", n_probes: int = N_PROBES) -> Figure:
    """A pick's strips drawn now: the first probes' images at `judge`'s recommended step above the last step's (the
    same seeds as the grid), for one method's summary (``pick``'s result["methods"][method])."""
    rec, last = summary["judges"][judge]["recommendation"]["step"], summary["steps"][-1]
    paths = dict(checkpoints(concept, method, every=1))
    setup = CheckpointSetup(pipe, concept, None, None, None, n_probes, generation)
    strips = [setup.images(method if k else None, paths.get(k)) for k in (rec, last)]
    return strip_plot(strips[0], strips[1], (rec, last), title=f"{method}: recommended vs last")


def grid_setup(folder: Any, pipe: Pipeline, clip: Any, dino: Any, oracle: Any, methods: Optional[Sequence[str]],
               out: Any, n_probes: int, settings: Optional[StudySettings]) -> tuple[Concept, list[str], Path,
                                                                                   CheckpointSetup]:
    """What pick and repair both start from: (the concept, its methods, the output folder (default the concept's),
    the checkpoint setup on fixed probes); the oracle refused for a full-scale concept."""
    concept = read_concept(folder)
    if oracle is not None and not is_embedded(concept.model):
        raise PickError("the oracle reads ShapesWorld scenes only; leave it out for a full-scale concept")
    where = Path(out) if out is not None else Path(concept.folder)
    gen = (settings or StudySettings()).generation(is_embedded(concept.model))
    return concept, methods_of(concept, methods), where, CheckpointSetup(pipe, concept, clip, dino, oracle, n_probes,
                                                                         gen)


def pick(folder: Any, pipe: Pipeline, clip: Any, dino: Any = None, oracle: Any = None,
         methods: Optional[Sequence[str]] = None, out: Any = None, every: int = EVERY, n_probes: int = N_PROBES,
         settings: Optional[StudySettings] = None, figures: bool = True, progress: bool = True,
         state: Any = None) -> Optional[dict[str, Any]]:
    """The picker on a concept folder: OUT/pick/pick.json, OUT/pick/<method>_tradeoff.png and _strips.png (each
    with its provenance .json); OUT defaults to the concept folder. Resumable and sharded (cells in pick/cells/).
    Returns the result on the main process, None on the others."""
    concept, names, where, setup = grid_setup(folder, pipe, clip, dino, oracle, methods, out, n_probes, settings)
    pick_dir = where / PICK_DIR
    ckpts = {m: checkpoints(concept, m, every) for m in names}
    cells = [cell(part="step0")] + [cell(method=m, step=k) for m in names for k, _ in ckpts[m]]
    paths = {(m, k): p for m in names for k, p in ckpts[m]}

    def compute(c: dict) -> dict:
        method = c.get("method")
        sig, scores = setup.signal(method, paths.get((method, c.get("step"))))
        return {"step": int(c.get("step", 0)), "signal": sig, "scores": scores}

    grid = {"concept": concept.name or str(concept.folder), "model": concept.model, "every": every,
            "probes": n_probes, "probe_seed": PROBE_SEED, "generation_seed": GENERATION_SEED, **setup.generation,
            "judges": [describe_evaluator(j) for j in (clip, dino, oracle)]}
    with confined(where):
        results = run_cells(cells, compute, pick_dir, grid, state=state, progress=progress, desc="pick")
        if results is None:
            return None
        step0 = results["step0"]
        summaries = {}
        for m in names:
            rows = [step0] + [results[cell(method=m, step=k)["id"]] for k, _ in ckpts[m]]
            summaries[m] = summarize_method(m, rows)
        result = {"format": "persviz pick 1", "concept": concept.to_json(), "settings": grid, "rule": "docs/pick.md §2",
                  "methods": summaries, "figures": []}
        if figures:
            for m, s in summaries.items():
                record = {"concept": grid["concept"], "method": m, "settings": grid, "command": "persviz pick"}
                fig = tradeoff_figure(s)
                result["figures"] += [str(p) for p in _save_figure(fig, pick_dir / f"{m}_tradeoff", record)]
                rec = s["judges"]["clip"]["recommendation"]["step"]
                last = s["steps"][-1]
                strips = [setup.images(m if k else None, paths.get((m, k))) for k in (rec, last)]
                fig = strip_plot(strips[0], strips[1], (rec, last), title=f"{m}: the first {STRIP} probes")
                result["figures"] += [str(p) for p in _save_figure(fig, pick_dir / f"{m}_strips", record)]
        write_json(pick_dir / "pick.json", result)
    return result


def fast_pick(folder: Any, pipe: Pipeline, methods: Optional[Sequence[str]] = None, every: int = EVERY,
              n_probes: int = N_PROBES, warning: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """``pick --fast``: the signal per checkpoint, no image; a recommendation only for a row-snapshot run and only
    when the early-warning experiment's verdict is 'predicts' (warning: its result; default the shipped one)."""
    concept = read_concept(folder)
    names = methods_of(concept, methods)
    warning = read_result() if warning is None else warning
    setup = CheckpointSetup(pipe, concept, None, None, None, n_probes, {})
    verdict = (warning or {}).get("verdict")
    out: dict[str, Any] = {"format": "persviz pick fast 1", "concept": concept.to_json(), "early_warning": {
        "verdict": verdict, "correlation": (warning or {}).get("correlation"), "runs": (warning or {}).get("done")},
        "methods": {}}
    for m in names:
        rows = [{"step": 0, **setup.signal(None, None, fast=True)[0]}]
        rows += [{"step": k, **setup.signal(m, p, fast=True)[0]} for k, p in checkpoints(concept, m, every)]
        entry: dict[str, Any] = {"signal": rows, "recommendation": None}
        if not get_method(m).row_snapshots:
            entry["why"] = "no experiment validates the drift of this method's checkpoints; run pick without --fast"
        elif not (verdict and verdict.get("predicts")):
            entry["why"] = ("the early-warning experiment found that the signal does not predict collapse"
                            + (f" ({verdict['why']})" if verdict else " (no result shipped)")
                            + "; run pick without --fast")
        else:
            steps = [r["step"] for r in rows]
            pred = predicted_step(steps, [r["percentile"] for r in rows], TAIL)
            before = [k for k in steps if k > 0 and (pred is None or k < pred)]
            entry["predicted_collapse"] = pred
            entry["recommendation"] = before[-1] if before else None
            entry["why"] = "the last checkpoint before |V*| leaves the vocabulary's p95"
        out["methods"][m] = entry
    return out


def fast_text(result: Mapping[str, Any]) -> str:
    """What ``pick --fast`` prints."""
    lines = []
    ew = result["early_warning"]
    c, v = ew.get("correlation"), ew.get("verdict")
    if c:
        rho = "undefined" if c["rho"] is None or c["rho"] != c["rho"] else f"{c['rho']:.2f} [{c['low']:.2f}, {c['high']:.2f}]"
        lines.append(f"how sure: the early-warning experiment (docs/pick.md §4) measured rho = {rho} over {c['n']} "
                     f"runs: {'predicts' if v and v['predicts'] else 'does not predict'}")
    for m, e in result["methods"].items():
        lines.append(f"{m}:")
        for r in e["signal"]:
            parts = [f"drift {r['drift']:.4f}" if r.get("drift") is not None else "drift NaN"]
            if r.get("ratio") is not None:
                parts.append(f"|V*|/|c| {r['ratio']:.2f}, cos {r['cosine']:.2f}, p{r['percentile']:.0f}")
            lines.append(f"  step {r['step']}: " + ", ".join(parts))
        rec = e["recommendation"]
        lines.append(f"  recommendation: {'step ' + str(rec) if rec is not None else 'none'} ({e['why']})")
    return "\n".join(lines)


def pick_text(result: Mapping[str, Any]) -> str:
    """What ``persviz pick`` prints: per method, the recommendation by each judge, the front, the collapse step."""
    lines = []
    for m, s in result["methods"].items():
        lines.append(f"{m} (steps {s['steps'][0]}..{s['steps'][-1]}, {len(s['steps'])} checkpoints):")
        for judge, j in s["judges"].items():
            rec = j["recommendation"]
            k = s["steps"].index(rec["step"])
            iv = {key: mlh(s["intervals"][key][k]) for key in (j["identity"], j["context"])}
            desc = ", ".join(f"{key} {a:.3g} [{b:.3g}, {c:.3g}]" for key, (a, b, c) in iv.items())
            lines.append(f"  {judge}: keep step {rec['step']}{' (context collapsed)' if rec['collapsed'] else ''}: "
                         f"{desc}; front {j['front']}; collapse step {j['collapse_step']}")
        if "clip_pick_on_oracle_front" in s:
            lines.append(f"  CLIP's pick on the oracle's front: {'yes' if s['clip_pick_on_oracle_front'] else 'no'}")
    return "\n".join(lines)


def pick_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (concept, method) of several pick results ({concept: pick.json}): each judge's recommendation,
    the oracle's front, whether CLIP's pick lies on it, the collapse steps."""
    rows = []
    for name, res in results.items():
        for m, s in res["methods"].items():
            j = s["judges"]
            row = {"concept": name, "method": m, "checkpoints": len(s["steps"]),
                   "CLIP pick": j["clip"]["recommendation"]["step"], "CLIP collapse": j["clip"]["collapse_step"]}
            if "oracle" in j:
                row.update({"oracle pick": j["oracle"]["recommendation"]["step"], "oracle front": j["oracle"]["front"],
                            "CLIP pick on oracle front": s["clip_pick_on_oracle_front"],
                            "oracle collapse": j["oracle"]["collapse_step"]})
            rows.append(row)
    return rows


def read_pick(path: Any) -> dict[str, Any]:
    """A pick.json (a file, or the folder holding pick/pick.json); a PickError naming the command when absent."""
    p = Path(path)
    p = p / PICK_DIR / "pick.json" if p.is_dir() else p
    if not p.is_file():
        raise PickError(f"no pick result at {p}; run `persviz pick CONCEPT_DIR --out {p.parent.parent}` first")
    return json.loads(p.read_text())


__all__ = ["EVERY", "early_warning_plot", "JUDGES", "PICK_DIR", "checkpoints", "drift", "fast_pick", "fast_text", "final_step", "grid_setup", "pick",
           "pick_rows", "pick_text", "prompt_states", "read_pick", "recommended_strips", "strip_plot", "summarize_method", "tradeoff_figure", "tradeoff_plot"]
