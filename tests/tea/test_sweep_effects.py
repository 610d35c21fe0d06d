"""Reading a saved sweep: per-cell intervals on the grid and the cells that differ from the untouched token."""
import numpy as np
import pytest

from persviz.evaluation import Evaluation
from persviz.stats import bootstrap_mean, holm, paired_difference
from persviz.tea.sweep import UNTOUCHED, condition
from persviz.tea.sweep_effects import showcase, sweep_arrays, sweep_effects

ROT, SCA = [0.0, 0.5], [0.0, 1.0]


def toy_sweep():
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(10) for _ in range(2)]
    base = rng.normal(50, 3, 20)
    items = {}
    for r in ROT:
        for s in SCA:
            shift = 4.0 * r  # rotation moves the score, scale does not
            items[condition(r, s)] = {"prompt": prompts, "seed": [0, 1] * 10,
                                      "clip_i": list(base + shift + rng.normal(0, 0.1, 20))}
    items = {UNTOUCHED: items[condition(0, 0)], **items}
    return Evaluation(items, {"grid": {"rotations": ROT, "scales": SCA}})


def test_arrays_are_each_cells_interval():
    ev = toy_sweep()
    a = sweep_arrays(ev, "clip_i", n_boot=300)
    assert a["mean"].shape == (2, 2) and a["rotations"] == ROT
    ref = bootstrap_mean(ev.grouped(condition(0.5, 1.0), "clip_i")[1], n_boot=300)
    assert (a["mean"][1, 1], a["low"][1, 1], a["high"][1, 1]) == pytest.approx((ref.mean, ref.low, ref.high))


def test_effects_are_paired_against_the_untouched_cell_and_holm_corrected_over_the_sweep():
    ev = toy_sweep()
    rows = sweep_effects(ev, ["clip_i"], n_boot=300)
    assert [r["cell"] for r in rows] == [condition(0, 1.0), condition(0.5, 0), condition(0.5, 1.0)]
    held = {r["cell"] for r in rows if r["holds"]}
    assert held == {condition(0.5, 0), condition(0.5, 1.0)}  # only rotation moved the score
    d = paired_difference(ev.grouped(condition(0, 0), "clip_i")[1], ev.grouped(condition(0.5, 0), "clip_i")[1], 300)
    assert rows[1]["difference"] == pytest.approx(d.mean)
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))


def test_a_sweep_without_its_grid_or_origin_says_so():
    with pytest.raises(ValueError, match="persviz sweep"):
        sweep_arrays(Evaluation({}, {}), "clip_i")
    ev = toy_sweep()
    del ev.items[condition(0, 0)]
    with pytest.raises(ValueError, match="rotation 0, scale 0"):
        sweep_effects(ev)


def test_showcase_is_the_image_with_the_largest_gain_ties_to_a_kept_concept_then_the_smaller_knobs():
    def cell(ctx, concept, clip):
        return {"prompt": ["a", "a", "b", "b"], "seed": [0, 1, 2, 3], "oracle_context": ctx,
                "oracle_concept": concept, "clip_t_context": clip}

    items = {condition(0, 0): cell([0, 1, 0, 0], [1, 1, 1, 1], [10, 10, 10, 10]),
             condition(0, 1): cell([0, 1, 1, 0], [1, 1, 0, 1], [10, 10, 30, 10]),   # b/2 gains, concept lost
             condition(0.5, 0): cell([1, 1, 1, 0], [0, 1, 1, 1], [11, 10, 10, 50]),  # a/0 lost, b/2 gains and kept
             condition(0.5, 1): cell([1, 0, 1, 1], [1, 1, 1, 1], [10, 10, 10, 10])}  # a/0, b/2, b/3 gain and kept
    ev = Evaluation({UNTOUCHED: items[condition(0, 0)], **items}, {"grid": {"rotations": ROT, "scales": SCA}})
    best = showcase(ev)
    assert (best["prompt"], best["seed"], best["rotation"], best["scale"]) == ("b", 2, 0.5, 0.0)
    assert (best["metric"], best["before"], best["after"], best["gain"], best["kept"]) == ("oracle_context", 0, 1, 1, 1)
    assert best["searched"] == 12  # 3 cells x 4 images, the untouched cell left out
    clip = showcase(ev, "clip_t_context")
    assert (clip["prompt"], clip["seed"], clip["rotation"], clip["scale"], clip["gain"]) == ("b", 3, 0.5, 0.0, 40)
    for it in items.values():
        del it["oracle_context"], it["oracle_concept"]
    assert showcase(ev)["metric"] == "clip_t_context"  # no oracle (full scale): CLIP-T of the context
    with pytest.raises(ValueError, match="no 'dino_i'"):
        showcase(ev, "dino_i")
