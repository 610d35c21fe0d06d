"""The world's shipped state agrees with its own search (docs/world.md §6-§7): which runs learned their concept, the
recipes the runs were trained with, and the concept table, recomputed from each image's hit with scipy's Wilson."""
import json

import numpy as np
import pytest
from scipy.stats import binomtest

from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR, LEARNED_BY, SHIPPED_RECIPES
from persviz.shapesworld.world_report import CLASS_WORD_ROW, concept_table, concept_table_markdown
from persviz.shapesworld.world_search import RESULTS_JSON, TARGET_LOW, TARGET_RATE, read_cells

METHODS = ("textual_inversion", "dreambooth", "custom_diffusion")


def round2():
    return {(c["method"], c["concept"]): c for c in read_cells(RESULTS_JSON) if c["seed_set"] == "held_out2"}


def test_learned_by_is_what_the_round2_hits_say():
    cells = round2()
    assert set(cells) == {(m, n) for m in METHODS for n in CONCEPTS}
    for (method, name), c in cells.items():
        hits = np.array(c["hits"])
        k, n = int(hits.sum()), hits.size
        lo = binomtest(k, n).proportion_ci(0.95, method="wilson").low
        meets = k / n >= TARGET_RATE and min(lo, c["rate"]["boot_low"]) >= TARGET_LOW - 1e-9
        assert (method in LEARNED_BY[name]) == meets, (method, name, k, n, lo)
        assert c["rate"]["wilson_low"] == pytest.approx(lo, abs=1e-9)


def test_the_shipped_runs_were_trained_with_the_shipped_recipes():
    selected = json.loads(RESULTS_JSON.read_text())["selected"]
    for name in CONCEPTS:
        for method in METHODS:
            cfg = json.loads((CONCEPTS_DIR / name / method / "config.json").read_text())
            want = SHIPPED_RECIPES[name][method]
            assert (cfg["lr"], cfg["steps"]) == (want["lr"], want["steps"]), (name, method)
            pick = selected[f"{method}__{name}__round2"]
            if pick["selection_rate"] > 0:  # the amendment: a run that fails everywhere keeps round 1's recipe
                assert (pick["lr"], pick["step"]) == (want["lr"], want["steps"]), (name, method)


def test_concept_table_has_every_run_and_the_class_word_control():
    rows = concept_table(METHODS)
    assert len(rows) == len(CONCEPTS) * (len(METHODS) + 1)
    for r in rows:
        if r["method"] == CLASS_WORD_ROW:
            assert r["plain"]["k"] == 0 and r["contextual"]["k"] == 0  # the class word never draws the concept
            assert r["meets"] is None
        else:
            assert r["meets"] == (r["method"] in LEARNED_BY[r["concept"]])
            assert 0 <= r["contextual"]["rate"] <= 1 and r["contextual"]["n"] == 48
    md = concept_table_markdown(rows).splitlines()
    assert len(md) == 2 + len(rows) and md[0].startswith("| concept | method")
