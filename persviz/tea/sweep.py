"""``persviz sweep``: token-level TEA over a rotation x scale grid on a concept folder's Textual Inversion run, every
image scored (persviz.evaluation), sharded over processes (persviz.shards).

One cell is (rotation, scale, a chunk of the probes); its images are seeded by their place in the whole probe set
(seed + probe index x seeds + seed index), never by the cell's place in the grid, so any sharding gives the same
images. The gathered result is one Evaluation with one condition per (rotation, scale), 'rotation 0.2, scale 0.5',
plus 'untouched token' when the grid holds rotation 0, scale 0 (TEA's identity), saved as OUT/sweep.json.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from persviz.families.base import Pipeline
from persviz.methods import tracked_method
from persviz.concept_folder import read_concept
from persviz.evaluation import Evaluation, evaluate, probe_keys
from persviz.generation import GUIDANCE, STEPS
from persviz.io import PathLike
from persviz.loading import is_embedded
from persviz.shards import cell, run_cells
from persviz.shapesworld.concepts import reference_signature
from persviz.tea.adjust import check_knob
from persviz.tea.concept_study import probes_for, set_aside
from persviz.tea.pipeline import tea
from persviz.tea.study import generate_probes, personalized

SWEEP_JSON = "sweep.json"
UNTOUCHED = "untouched token"


def condition(rotation: float, scale: float) -> str:
    """The condition name of one grid point: 'rotation 0.2, scale 0.5'."""
    return f"rotation {rotation:g}, scale {scale:g}"


def sweep_cells(rotations: Sequence[float], scales: Sequence[float], n_probes: int,
                chunk: Optional[int] = None) -> list[dict]:
    """The cells of the grid: rotation x scale x chunks of `chunk` probes (default: all probes in one chunk)."""
    if not rotations or not scales:
        raise ValueError("the sweep needs at least one rotation and one scale")
    rotations = [check_knob(float(r), "rotation") for r in rotations]
    scales = [check_knob(float(s), "scale") for s in scales]
    if len(set(rotations)) != len(rotations) or len(set(scales)) != len(scales):
        raise ValueError(f"a rotation or scale is given twice: {rotations}, {scales}")
    if n_probes < 1:
        raise ValueError(f"the sweep needs at least one prompt; got {n_probes}")
    chunk = n_probes if not chunk else int(chunk)
    if chunk < 1:
        raise ValueError(f"--chunk must be at least 1; got {chunk}")
    spans = [(a, min(a + chunk, n_probes)) for a in range(0, n_probes, chunk)]
    return [cell(rotation=r, scale=s, prompts=[a, b]) for r in rotations for s in scales for a, b in spans]


def gather_sweep(results: Mapping[str, Mapping], cells: Sequence[Mapping], meta: Mapping[str, Any]) -> Evaluation:
    """The cells' evaluations as one: a condition per (rotation, scale), its chunks in probe order."""
    items: dict[str, dict[str, list]] = {}
    first = None
    for c in cells:
        ev = Evaluation.from_json(results[c["id"]])
        first = first or ev
        for cond, v in ev.items.items():
            dst = items.setdefault(cond, {})
            for k, xs in v.items():
                dst.setdefault(k, []).extend(xs)
    zero = condition(0.0, 0.0)
    if zero in items:
        items = {UNTOUCHED: copy.deepcopy(items[zero]), **items}
    counts = {c: {"prompts": len(set(v["prompt"])), "images": len(v["prompt"])} for c, v in items.items()}
    return Evaluation(items, {**first.meta, "counts": counts, **meta})


def run_sweep(folder: PathLike, pipe: Pipeline, clip: Any, dino: Any = None, oracle: Any = None,
              rotations: Sequence[float] = (0.0, 0.2), scales: Sequence[float] = (0.0, 0.5), n_probes: int = 48,
              repeats: int = 2, out: PathLike = "sweep", seed: int = 0, chunk: Optional[int] = None,
              steps: int = STEPS, guidance: float = GUIDANCE, batch_size: int = 8, state: Any = None,
              progress: bool = True) -> Optional[Evaluation]:
    """The sweep of a concept folder's Textual Inversion run, its cells in OUT/cells/, the result OUT/sweep.json
    (returned on the main process; None on the others). A killed run resumes with the missing cells."""
    concept = read_concept(folder)
    if tracked_method(concept.runs) is None:
        raise ValueError(f"{concept.folder} has no Textual Inversion run; train one with `persviz train ti`")
    shapesworld = is_embedded(concept.model)
    if oracle is not None and not shapesworld:
        raise ValueError("the oracle reads ShapesWorld scenes only; pass oracle=None for this concept")
    cells = sweep_cells(rotations, scales, n_probes, chunk)
    probes = probes_for(concept, n_probes, 0)
    if len(probes) < n_probes:
        raise ValueError(f"{concept.name} has {len(probes)} probes; ask for at most that many prompts")
    keys = probe_keys(probes)  # ids of the whole probe set, whatever the chunking
    refs = concept.reference_images()
    signature = reference_signature(oracle, refs) if oracle is not None else None
    token = concept.token("textual_inversion")
    grid = {"rotations": [float(r) for r in rotations], "scales": [float(s) for s in scales], "prompts": n_probes,
            "seeds": repeats, "seed": seed, "steps": steps, "guidance": guidance, "chunk": chunk or n_probes,
            "method": "textual_inversion", "token": token, "model": concept.model}

    def compute(c: dict) -> dict:
        a, b = c["prompts"]
        part = probes[a:b]
        first = seed + a * repeats  # the image's place in the whole probe set, not the cell's place in the grid
        with tea(pipe, token, concept.class_word, rotation=c["rotation"], scale=c["scale"]):
            images = generate_probes(pipe, part, token, repeats, first, guidance, steps, batch_size)
        ev = evaluate({condition(c["rotation"], c["scale"]): images}, part, concept.class_word, refs, clip, dino,
                      oracle, signature, repeats, seeds=range(first, first + len(images)), concept=concept.name,
                      prompt_ids=keys[a:b],
                      scale="shapesworld" if shapesworld else "full")
        return ev.to_json()

    settings = {**grid, "judges": {"clip": clip is not None, "dino": dino is not None, "oracle": oracle is not None},
                "concept": str(Path(concept.folder).resolve()), "batch_size": batch_size}
    with set_aside(pipe, token), personalized(pipe, "textual_inversion", concept.run_dir("textual_inversion")):
        results = run_cells(cells, compute, out, settings, state=state, progress=progress, desc="TEA sweep")
    if results is None:
        return None
    ev = gather_sweep(results, cells, {"grid": grid})
    ev.save(Path(out) / SWEEP_JSON)
    return ev


__all__ = ["SWEEP_JSON", "UNTOUCHED", "condition", "gather_sweep", "run_sweep", "sweep_cells"]
