"""Nothing moved: a slice of the shipped TEA table recomputes equal through today's code (the method registry's
load-and-undo, the text stack, the family's assembler): candy's first 4 probes x 2 seeds, every method, without and
with TEA, scored per image against the values data/shapesworld/concepts/tea_table.json holds for the same prompts
and seeds. Images are seeded per image (GENERATION_SEED + index), so the slice's images are the full table's."""
from __future__ import annotations

import json

import numpy as np
import pytest

from persviz.evaluation import evaluate
from persviz.families import assemble_pipeline
from persviz.methods import METHODS
from persviz.shapesworld.concepts import CONCEPTS_DIR, eval_prompts, get_concept, load_references, oracle_signature
from persviz.tea.shapesworld_runs import GENERATION_SEED, run_tea_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_PROBES, REPEATS = 4, 2
# CLIP and DINO scores (0-100 scale) may differ in float32 by the order of a batch's arithmetic (one image of the
# slice differs by 0.012 in CLIP-T, 0.06 %; the same code gives identical scores run to run); the oracle's 0/1 readings must be identical.
TOLERANCE = 0.05


def test_candy_tea_table_slice_recomputes_equal(clip_eval, oracle):
    from persviz.loading import load_evaluator
    saved = json.loads((CONCEPTS_DIR / "tea_table.json").read_text())
    settings = saved["settings"]
    items = saved["evaluations"]["candy"]["items"]
    pipe = assemble_pipeline("shapesworld")
    dino = load_evaluator(kind="dino")
    probes = eval_prompts("candy", settings["probes"], seed=settings["seed"])[:N_PROBES]
    from persviz.constants import CLASS_WORD_ROW
    from persviz.tea.study import generate_probes
    images = {CLASS_WORD_ROW: generate_probes(pipe, probes, get_concept("candy").class_word, REPEATS,
                                              seed=GENERATION_SEED)}
    for method in METHODS:
        rows = run_tea_rows(pipe, method, "candy", probes, lambda ims: ims, REPEATS, seed=GENERATION_SEED)
        images.update({f"{method} {label}".replace(" none", ""): ims for label, ims in rows.items()})
    n = N_PROBES * REPEATS
    ev = evaluate(images, probes, get_concept("candy").class_word, load_references("candy"), clip_eval, dino, oracle,
                  oracle_signature(oracle, "candy"), REPEATS, seeds=[GENERATION_SEED + i for i in range(n)],
                  concept="candy", scale="shapesworld")
    assert set(ev.items) == set(items)
    compared, worst = 0, 0.0
    for row, scores in ev.items.items():
        want = items[row]
        assert want["prompt"][:n] == scores["prompt"] and want["seed"][:n] == scores["seed"]
        for metric in (m for m in scores if m not in ("prompt", "seed")):
            got, ref = np.asarray(scores[metric], float), np.asarray(want[metric][:n], float)
            tol = 0.0 if metric.startswith("oracle") else TOLERANCE
            assert np.allclose(got, ref, atol=tol, rtol=0), (row, metric, got - ref)
            worst = max(worst, float(np.abs(got - ref).max()))
            compared += n
    assert compared >= 8 * 8 * 5  # 8 rows (the class word's too) x 8 images x at least 5 measures
    print(f"{compared} scores compared, largest difference {worst:.5f}")
