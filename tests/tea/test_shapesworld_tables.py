"""The shipped TEA tables' layout: summarize_tea_table on hand-made per-image scores, and what tea_table_rows shows."""
import numpy as np
import pytest

from persviz.evaluation import Evaluation, combine
from persviz.stats import bootstrap_mean, paired_difference
from persviz.tea.shapesworld_runs import summarize_tea_table, tea_table_rows


def toy(seed, shift):
    rng = np.random.default_rng(seed)
    prompts = [f"p{i}" for i in range(6) for _ in range(2)]
    base = rng.normal(50, 5, 12)
    items = {c: {"prompt": prompts, "seed": [0, 1] * 6, "clip_i": list(base + d),
                 "oracle_context": list((rng.random(12) < 0.5).astype(float))}
             for c, d in (("textual_inversion", 0.0), ("textual_inversion TEA", shift))}
    return Evaluation(items, {"scale": "shapesworld"})


def test_summary_pools_concepts_and_pairs_each_method_with_its_tea_row():
    evs = {"candy": toy(0, 2.0), "spark": toy(1, 2.0)}
    out = summarize_tea_table(evs, {"probes": 6, "repeats": 2}, n_boot=400)
    both = combine(evs)
    ref = bootstrap_mean(both.grouped("textual_inversion TEA", "clip_i")[1], n_boot=400)
    assert out["intervals"]["textual_inversion TEA"]["clip_i"]["low"] == pytest.approx(ref.low)
    d = out["differences"]["textual_inversion TEA"]["clip_i"]
    assert d["mean"] == pytest.approx(2.0) and d["low"] == pytest.approx(2.0) and d["p"] < 0.001
    want = paired_difference(both.grouped("textual_inversion", "oracle_context")[1],
                             both.grouped("textual_inversion TEA", "oracle_context")[1], n_boot=400)
    assert out["differences"]["textual_inversion TEA"]["oracle_context"]["mean"] == pytest.approx(want.mean)
    assert out["per_concept"]["textual_inversion"]["candy"]["clip_i"] == pytest.approx(np.mean(evs["candy"].items["textual_inversion"]["clip_i"]))
    assert out["meta"]["counts"]["textual_inversion"] == {"prompts": 12, "images": 24}
    rows, diffs = tea_table_rows(out, ["clip_i"])
    assert rows["textual_inversion"]["n"] == "12 prompts, 24 images" and set(rows["textual_inversion"]) == {"clip_i", "n"}
    assert diffs["textual_inversion TEA"]["clip_i"].p_holm >= diffs["textual_inversion TEA"]["clip_i"].p


def test_a_table_of_means_only_says_how_to_rewrite_it():
    with pytest.raises(ValueError, match="persviz tea evaluate"):
        tea_table_rows({"mean": {}})
