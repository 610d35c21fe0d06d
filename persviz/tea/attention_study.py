"""Where the learned token looks over training and under TEA, against ShapesWorld's ground truth (issue 13).

    persviz tea attention                      # 3 concepts x (TI steps 0..3000, with/without TEA; DB, CD) -> JSON
    study = read_attention_study()             # {'evaluations': {concept: Evaluation}, 'two_object': {...}, ...}

Each image is generated with persviz.attention's collector around the pipeline; its regions are found from the
image itself (persviz.shapesworld.regions: the background the oracle reads, foreground pixels split between the
slots the prompt names) and the maps are measured inside them, per image:

* ``vstar_share``: V*'s share of the attention on the prompt's word tokens (start, end and padding apart);
  ``start_share``: the start token's share of the whole mass (reported beside, as the collector does).
* ``vstar_leak`` (and ``vstar_leak_<h>x<w>`` per own resolution of the UNet's maps): the share of V*'s attention
  outside the object's region; an image without the object at its slot has an empty region, so leak 1.
  ``object_area``: that region's share of the image; ``vstar_leak_excess``: the leak minus a uniform map's
  (1 − object_area), negative when V* looks at its object more than at random.
* ``context_share``: the summed shares of the context words (the background colour and "background", the
  position word, the second object's colour and shape); ``background_inside`` (per resolution too): the share of
  the background words' attention inside the background region.
* two-object prompts only (their own Evaluation): ``second_inside`` (per resolution): the share of the second
  object's words' attention inside its region; ``second_share``: their share of the word-token attention.
* ``placed``: 1 when the oracle reads the class word's shape at the slot the prompt gives the concept (at any slot
  when the prompt names no position).

The reference is step 0, the Textual Inversion token at its initial row: the class word's own embedding, so the
class word's leak on the same prompts and seeds. TEA is token level with the method's default knobs for Textual
Inversion and Custom Diffusion, prompt level (aligned) for DreamBooth. Results follow the evaluation protocol
(persviz.evaluation, docs/evaluation.md): prompts are the bootstrap's units, seeds nested.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from persviz.families.base import Pipeline
from persviz.families import text_stack
from persviz.methods import get_method, tracked_method
from persviz.attention import AttentionMaps, attention_maps, inside_share, word_positions
from persviz.constants import ATTENTION_STEP_EVERY as STEP_EVERY
from persviz.constants import ATTENTION_STUDY_JSON as STUDY_JSON
from persviz.evaluation import Evaluation, combine, probe_keys, protocol_note
from persviz.generation import GUIDANCE, STEPS
from persviz.io import PathLike, write_json
from persviz.shards import cell, run_cells
from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR, eval_prompts, get_concept, load_references
from persviz.shapesworld.regions import scene_regions
from persviz.stats import N_BOOT, Difference
from persviz.tea.pipeline import embeds_kwargs, encode_prompt_level, tea
from persviz.tea.shapesworld_runs import GENERATION_SEED, method_word, placeholder, run_dir, snapshots
from persviz.tea.study import learned_embedding, personalized, probe_texts
from persviz.trainers import METHODS

FORMAT = "persviz attention study 1"
DIGITS = 5  # per-image measures are kept to 5 decimals (shares in [0, 1]); the statistics use the kept values
OTHER_SLOT = {"left": "right", "right": "left"}
ATTENTION_ROWS = ("vstar_share", "vstar_leak", "vstar_leak_excess", "context_share", "background_inside",
                  "object_area", "placed", "second_inside", "second_share")  # what tables show, in this order


# ----------------------------------------------------------------------------- what a prompt's words are
def context_words(probe: Mapping[str, Any]) -> dict[str, list[str]]:
    """The context words of a contextual probe by what they refer to: {'background': [colour, 'background'],
    'position': ['left'], 'second': [colour, shape]} (the last two only when the probe has them)."""
    ctx = probe["context"]
    out = {"background": [ctx["background"], "background"]}
    if ctx.get("position"):
        out["position"] = [ctx["position"]]
    if ctx.get("second"):
        out["second"] = list(ctx["second"])
    return out


def layout(probe: Mapping[str, Any]) -> tuple[str, Optional[str]]:
    """(the concept's slot, the second object's slot or None) as the probe asks for them."""
    pos = probe["context"].get("position")
    if probe["context"].get("second"):
        if pos not in OTHER_SLOT:
            raise ValueError(f"a two-object probe puts the concept at 'left' or 'right'; got {pos!r}")
        return pos, OTHER_SLOT[pos]
    return pos or "center", None


def placed(reading: Mapping[str, Any], slot: Optional[str], class_word: str) -> bool:
    """The oracle reads the class word's shape at `slot` (None: at any slot, for a prompt that names no position)."""
    slots = [slot] if slot else ["left", "center", "right"]
    return any((reading.get(s) or {}).get("shape") == class_word for s in slots)


def _res_key(res: Any) -> str:
    return "" if res == "all" else f"_{res[0]}x{res[1]}"


def _maps_of(maps: AttentionMaps, i: int, positions: Sequence[int]) -> dict[Any, torch.Tensor]:
    """{"all" | (h, w): [h, w]} the summed maps of some token positions of image i."""
    pos = list(positions)
    out: dict[Any, torch.Tensor] = {"all": maps.token_maps[i, pos].sum(0)}
    for res, m in maps.resolution_maps.items():
        out[res] = m[i, pos].sum(0)
    return out


def image_measures(pipe: Pipeline, maps: AttentionMaps, images: np.ndarray, probes: Sequence[Mapping[str, Any]],
                   word: str, class_word: str, readings: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The measures of the module docstring for each image (probe i of `probes` is image i's), from the collected
    maps, the images and the oracle's readings of them."""
    if not len(images) == len(probes) == len(readings) == len(maps.prompts):
        raise ValueError(f"{len(images)} images, {len(probes)} probes, {len(readings)} readings and "
                         f"{len(maps.prompts)} collected maps: one of each per image")
    out = []
    for i, (img, probe, reading) in enumerate(zip(images, probes, readings)):
        prompt = maps.prompts[i]
        groups = context_words(probe)
        where = word_positions(pipe, prompt, [word] + [w for ws in groups.values() for w in ws])
        mass = maps.token_maps[i].mean((-2, -1))
        word_mass = float(maps.words_share[i])

        def share(ws: Sequence[str]) -> float:
            return float(sum(mass[p] for w in ws for p in where[w])) / word_mass

        own, second = layout(probe)
        slots = [own] + ([second] if second else [])
        regions = scene_regions(img, reading["background"], slots)
        obj, bg = regions[own], regions["background"]
        r = {"vstar_share": share([word]), "start_share": float(maps.special["start"][i]),
             "context_share": share([w for ws in groups.values() for w in ws]),
             "object_area": float(obj.mean()),
             "placed": float(placed(reading, own if second else None, class_word))}
        for res, m in _maps_of(maps, i, where[word]).items():
            r["vstar_leak" + _res_key(res)] = 1.0 - float(inside_share(m, obj))
        r["vstar_leak_excess"] = r["vstar_leak"] - (1.0 - r["object_area"])
        for res, m in _maps_of(maps, i, [p for w in groups["background"] for p in where[w]]).items():
            r["background_inside" + _res_key(res)] = float(inside_share(m, bg))
        if second:
            r["second_share"] = share(groups["second"])
            for res, m in _maps_of(maps, i, [p for w in groups["second"] for p in where[w]]).items():
                r["second_inside" + _res_key(res)] = float(inside_share(m, regions[second]))
        out.append(r)
    return out


# ----------------------------------------------------------------------------- generating with the collector
def generate_with_maps(pipe: Pipeline, prompts: Sequence[str], word: str, seed: int = 0, guidance: float = GUIDANCE,
                       steps: int = STEPS, batch_size: int = 48, embeds: Optional[tuple[torch.Tensor, ...]] = None
                       ) -> Iterator[tuple[int, np.ndarray, AttentionMaps]]:
    """Yields (first image index, uint8 images, their AttentionMaps) batch by batch; image i is seeded seed + i as
    persviz.generation.generate seeds it (the same images as without the collector). embeds: encode_prompt_level's
    result for the prompts (prompt-level TEA); the prompts then name the words."""
    for a in range(0, len(prompts), batch_size):
        chunk = list(prompts[a:a + batch_size])
        gens = [torch.Generator().manual_seed(seed + a + j) for j in range(len(chunk))]
        kw: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
        with attention_maps(pipe, [word], prompt=chunk) as maps:
            if embeds is None:
                res = pipe(chunk, **kw).images
            else:
                res = pipe(**{k: v[a:a + len(chunk)] for k, v in embeds_kwargs(embeds).items()}, **kw).images
        yield a, np.clip(np.round(res * 255), 0, 255).astype(np.uint8), maps


# ----------------------------------------------------------------------------- the study's conditions
def condition_name(method: str, step: Optional[int] = None, with_tea: bool = False) -> str:
    """'textual_inversion step 300', 'textual_inversion step 300 TEA', 'dreambooth', 'custom_diffusion TEA'."""
    return get_method(method).condition(step) + (" TEA" if with_tea else "")


def study_cells(concepts: Sequence[str] = tuple(CONCEPTS), steps: Sequence[int] = tuple(range(0, 3001, STEP_EVERY)),
                methods: Sequence[str] = METHODS) -> list[dict]:
    """One cell per (concept, condition): Textual Inversion at each step without TEA and (step > 0) with it; the
    final DreamBooth and Custom Diffusion runs without and with TEA."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose among {METHODS}")
    out = []
    for name in concepts:
        get_concept(name)
        for m in methods:
            if get_method(m).row_snapshots:
                out += [cell(concept=name, method=m, step=int(s), tea=t) for s in steps for t in (False, True)
                        if not (t and s == 0)]
            else:
                out += [cell(concept=name, method=m, step=-1, tea=t) for t in (False, True)]
    return out


@contextlib.contextmanager
def loaded_cell(pipe: Pipeline, c: Mapping[str, Any], root: Path) -> Iterator[None]:
    """The cell's model state: a TI snapshot row (step 0: the class word's row) or a final DB / CD run."""
    name, method = c["concept"], c["method"]
    if get_method(method).row_snapshots:
        cw = get_concept(name).class_word
        init = text_stack(pipe).primary.word_row(cw)
        snaps = dict(snapshots(run_dir(method, name, root), 100, init))
        if c["step"] not in snaps:
            raise ValueError(f"{name}'s Textual Inversion run has no snapshot at step {c['step']}; saved: "
                             f"{sorted(snaps)}")
        with learned_embedding(pipe, placeholder(name), snaps[c["step"]]):
            yield
    else:
        with personalized(pipe, method, run_dir(method, name, root)):
            yield


def cell_measures(pipe: Pipeline, oracle: Any, c: Mapping[str, Any], n_probes: int = 24, repeats: int = 2,
                  probe_seed: int = 1, guidance: float = GUIDANCE, steps: int = STEPS, batch_size: int = 48,
                  root: Path = CONCEPTS_DIR) -> dict[str, Any]:
    """One cell's per-image measures: {'prompt', 'seed', metric: [...]} for all images and for the two-object ones
    ('two_object'). The probes and seeds are tea_table's (eval_prompts(seed=1), images seeded 1000 + i)."""
    name, method = c["concept"], c["method"]
    cw = get_concept(name).class_word
    probes = eval_prompts(name, n_probes, seed=probe_seed)
    keys = probe_keys(probes)
    word, token = method_word(method, name)
    per_image = [p for p in probes for _ in range(repeats)]
    prompts = [t for t in probe_texts(probes, word) for _ in range(repeats)]
    seeds = [GENERATION_SEED + i for i in range(len(prompts))]
    rows: list[dict[str, float]] = []
    with loaded_cell(pipe, c, root):
        embeds = None
        adjust = contextlib.nullcontext()
        if c["tea"] and get_method(method).tea_level == "prompt":
            plain = [t for t in probe_texts(probes, cw) for _ in range(repeats)]
            embeds = encode_prompt_level(pipe, prompts, plain, placeholder=token, class_word=cw)
        elif c["tea"]:
            adjust = tea(pipe, token, cw, method=method)
        with adjust:
            for a, ims, maps in generate_with_maps(pipe, prompts, token, GENERATION_SEED, guidance, steps, batch_size,
                                                   embeds):
                readings = oracle.read(ims)
                rows += image_measures(pipe, maps, ims, per_image[a:a + len(ims)], token, cw, readings)
    ids = [k for k in keys for _ in range(repeats)]
    both = [i for i, p in enumerate(per_image) if layout(p)[1] is not None]
    every = {"prompt": ids, "seed": seeds, **{k: [r[k] for r in rows] for k in rows[0] if not k.startswith("second")}}
    two = {"prompt": [ids[i] for i in both], "seed": [seeds[i] for i in both],
           **{k: [rows[i][k] for i in both] for k in rows[both[0]] if k.startswith("second")}} if both else None
    return {"all": every, "two_object": two}


def run_attention_study(pipe: Pipeline, oracle: Any, work: PathLike, out: PathLike = STUDY_JSON,
                        concepts: Sequence[str] = tuple(CONCEPTS), steps: Sequence[int] = tuple(range(0, 3001, STEP_EVERY)),
                        methods: Sequence[str] = METHODS, n_probes: int = 24, repeats: int = 2,
                        guidance: float = GUIDANCE, sampler_steps: int = STEPS, batch_size: int = 48,
                        root: Path = CONCEPTS_DIR, state: Any = None, progress: bool = True,
                        n_boot: int = N_BOOT) -> Optional[dict]:
    """The study over its cells (one file each under WORK/cells, resumable, shardable), gathered, summarised and
    written to OUT (returned on the main process; None on the others)."""
    if oracle is None:
        raise ValueError("the attention study measures against ShapesWorld's ground truth: it needs the oracle "
                         "(load_evaluator(kind='oracle'))")
    cells = study_cells(concepts, steps, methods)
    settings = {"probes": n_probes, "repeats": repeats, "probe_seed": 1, "generation_seed": GENERATION_SEED,
                "guidance": guidance, "steps": sampler_steps, "step_every": sorted({int(s) for s in steps})}

    def compute(c: dict) -> dict:
        return cell_measures(pipe, oracle, c, n_probes, repeats, 1, guidance, sampler_steps, batch_size, root)

    results = run_cells(cells, compute, work, settings, state=state, progress=progress, desc="attention study")
    if results is None:
        return None
    study = gather_study(results, cells, settings, n_boot=n_boot)
    write_json(Path(out), study, indent=None)  # per-image lists: one line (about 1 MB for the shipped study)
    return study


def _evaluations(results: Mapping[str, Any], cells: Sequence[Mapping[str, Any]], part: str,
                 meta: Mapping[str, Any]) -> dict[str, Evaluation]:
    items: dict[str, dict[str, dict]] = {}
    for c in cells:
        r = results[c["id"]][part]
        if r is not None:
            name = condition_name(c["method"], c["step"], c["tea"])
            items.setdefault(c["concept"], {})[name] = {k: v if k in ("prompt", "seed") else [round(x, DIGITS) for x in v]
                                                        for k, v in r.items()}
    out = {}
    for name, it in items.items():
        counts = {k: {"prompts": len(set(v["prompt"])), "images": len(v["prompt"])} for k, v in it.items()}
        out[name] = Evaluation(it, {"concept": name, "class_word": get_concept(name).class_word,
                                    "scale": "shapesworld", "counts": counts, **meta})
    return out


def comparisons(steps: Sequence[int], methods: Sequence[str] = METHODS) -> list[tuple[str, str]]:
    """The paired comparisons the study reports (a, b: b − a): the last TI step against step 0 (the class word),
    TEA against none at the last step, and each other method's TEA against none and against the class word."""
    last = max(steps)
    tracked = tracked_method(methods)
    ref = condition_name(tracked.name, 0) if tracked is not None else None
    out = []
    if tracked is not None:
        out += [(ref, condition_name(tracked.name, last)),
                (condition_name(tracked.name, last), condition_name(tracked.name, last, True))]
    for m in methods:
        if tracked is None or m != tracked.name:
            out += [(m, condition_name(m, with_tea=True))] + ([(ref, m)] if tracked is not None else [])
    return out


def gather_study(results: Mapping[str, Any], cells: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                 n_boot: int = N_BOOT) -> dict:
    """attention_study.json's content: per-concept Evaluations (all images; two-object images), intervals over the
    three concepts' prompts together and per concept, and the paired differences of `comparisons`."""
    meta = {"protocol": protocol_note(n_boot), "settings": dict(settings)}
    evs, twos = _evaluations(results, cells, "all", meta), _evaluations(results, cells, "two_object", meta)
    steps = sorted({c["step"] for c in cells if get_method(c["method"]).row_snapshots})
    methods = list(dict.fromkeys(c["method"] for c in cells))
    pairs = comparisons(steps or [0], methods)
    out: dict[str, Any] = {"format": FORMAT, "settings": dict(settings), "protocol": meta["protocol"],
                           "steps": steps, "methods": methods, "comparisons": [list(p) for p in pairs]}
    for label, part in (("all", evs), ("two_object", twos)):
        if not part:
            continue
        both = combine(part)
        out[label] = {
            "intervals": {c: {m: iv.to_json() for m, iv in row.items()} for c, row in both.summary(n_boot).items()},
            "per_concept": {n: {c: {m: iv.to_json() for m, iv in row.items()} for c, row in ev.summary(n_boot).items()}
                            for n, ev in part.items()},
            "differences": {f"{b} vs {a}": {m: d.to_json() for m, d in both.compare(a, b, n_boot=n_boot).items()}
                            for a, b in pairs if a != b and a in both.items and b in both.items},
            "evaluations": {n: ev.to_json() for n, ev in part.items()}}
    return out


def att_size(study: dict) -> str:
    """What a read attention study pooled: '72 prompts × 2 seeds' (concepts × probes, and seeds per probe)."""
    n = len(study.get("all", {}).get("evaluations", {})) or 1
    st = study["settings"]
    return f"{n * st['probes']} prompts × {st['repeats']} seeds"


def read_attention_study(path: PathLike = STUDY_JSON) -> dict:
    """attention_study.json with its per-image measures as Evaluations (under 'all' / 'two_object' ->
    'evaluations': {concept: Evaluation})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no attention study at {path}; write it with `persviz tea attention`")
    d = json.loads(path.read_text())
    if d.get("format") != FORMAT:
        raise ValueError(f"{path} is not a persviz attention study (format {d.get('format')!r}, expected {FORMAT!r})")
    for part in ("all", "two_object"):
        if part in d:
            d[part]["evaluations"] = {k: Evaluation.from_json(v) for k, v in d[part]["evaluations"].items()}
    return d


def study_differences(study: Mapping[str, Any], a: str, b: str) -> dict[str, Difference]:
    """{metric: Difference} of b − a (one of the study's comparisons), the two-object measures included; the Holm
    correction is across the metrics of each part (all images; two-object images)."""
    out: dict[str, Difference] = {}
    for part in ("all", "two_object"):
        block = study.get(part, {}).get("differences", {})
        key = f"{b} vs {a}"
        if key not in block:
            if part == "all":
                raise KeyError(f"the study has no comparison {key!r}; it has {list(block)}")
            continue
        out.update({m: Difference(**d) for m, d in block[key].items()})
    return out


def step_curve(study: Mapping[str, Any], metric: str, with_tea: bool = False, part: str = "all",
               concept: Optional[str] = None) -> dict[str, np.ndarray]:
    """{'step', 'mean', 'low', 'high'} of one metric over the Textual Inversion steps (pooled over the concepts,
    or one concept's), from the study's intervals; with_tea: the TEA rows (from the first step > 0)."""
    block = study[part]["intervals"] if concept is None else study[part]["per_concept"][concept]
    rows = []
    for s in study["steps"]:
        name = condition_name("textual_inversion", s, with_tea and s > 0)
        if (with_tea and s == 0) or name not in block or metric not in block[name]:
            continue
        iv = block[name][metric]
        rows.append((s, iv["mean"], iv["low"], iv["high"]))
    if not rows:
        raise KeyError(f"the study has no {metric!r} over steps ({part}, {'TEA' if with_tea else 'no TEA'})")
    a = np.array(rows, dtype=np.float64)
    return {"step": a[:, 0].astype(int), "mean": a[:, 1], "low": a[:, 2], "high": a[:, 3]}


__all__ = ["ATTENTION_ROWS", "FORMAT", "STUDY_JSON", "att_size", "cell_measures", "comparisons", "condition_name",
           "context_words", "gather_study", "generate_with_maps", "image_measures", "layout", "loaded_cell", "placed",
           "read_attention_study", "run_attention_study", "step_curve", "study_cells", "study_differences"]
