"""persviz.tea.findings: the registered criteria of docs/findings.md on hand-made tracks and evaluations, checked
against hand-worked values and scipy."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from persviz.evaluation import Evaluation
from persviz.tea import findings as F


def track(n=30, norm_growth=2.0, cos_fall=0.5, inter=(80.0, 90.0), intra=(80.0, 70.0)):
    steps = list(range(100, 100 * n + 1, 100))
    t = np.linspace(0, 1, n)
    return {"step": steps, "vstar_norm": list(1.0 + norm_growth * t), "norm_ratio": list(1.0 + norm_growth * t),
            "cosine": list(0.9 - cos_fall * t),
            "inter_l2": list(inter[0] + (inter[1] - inter[0]) * t), "inter_mahalanobis": list(20 + 10 * t),
            "intra_vstar_l2": list(intra[0] + (intra[1] - intra[0]) * t), "intra_vstar_mahalanobis": list(14 - t)}


def test_norm_drift_holds_only_when_every_registered_criterion_does():
    vocab = np.linspace(0.5, 2.0, 1000)  # |V*| ends at 3.0: beyond every row
    d = F.norm_drift(track(), vocab)
    assert d["holds"] and d["percentile"] == 100.0 and d["rho_norm"] == pytest.approx(1.0)
    assert d["norm_ratio"] == pytest.approx([1.0, 3.0]) and d["cosine"] == pytest.approx([0.9, 0.4])
    # ends inside the vocabulary's bulk: 2.0 of a 0.5..4.0 range is the 43rd percentile, not beyond the 95th
    bulk = F.norm_drift(track(norm_growth=1.0), np.linspace(0.5, 4.0, 1000))
    assert not bulk["holds"] and bulk["percentile"] == pytest.approx(100 * np.mean(np.linspace(0.5, 4.0, 1000) < 2.0))
    assert not F.norm_drift(track(cos_fall=-0.05), vocab)["holds"]  # the direction did not leave the class word


def test_norm_drift_rank_correlation_is_scipys():
    t = track()
    wobble = [v + (0.5 if i % 2 else 0.0) for i, v in enumerate(t["vstar_norm"])]
    t["vstar_norm"] = wobble
    d = F.norm_drift(t, np.linspace(0, 1, 10))
    assert d["rho_norm"] == pytest.approx(spearmanr(t["step"], wobble).statistic)


def test_text_collapse_needs_inter_up_and_intra_down():
    assert F.text_collapse(track())["holds"]
    flat = F.text_collapse(track(intra=(80.0, 81.0)))  # the spread grows a little: the old ShapesWorld runs
    assert not flat["holds"] and flat["inter_l2"]["holds"] and not flat["intra_vstar_l2"]["holds"]
    assert flat["intra_vstar_l2"]["first"] == 80.0 and flat["intra_vstar_l2"]["last"] == pytest.approx(81.0)


def evaluation(rows: dict, n_prompts=12, seeds=2) -> Evaluation:
    """Per-image 0/1 (or float) scores: rows {condition: {metric: value per image or a constant}}."""
    prompts = [f"p{i}" for i in range(n_prompts) for _ in range(seeds)]
    seed = [s for _ in range(n_prompts) for s in range(seeds)]
    items = {}
    for cond, metrics in rows.items():
        items[cond] = {"prompt": prompts, "seed": seed}
        for m, v in metrics.items():
            items[cond][m] = list(np.broadcast_to(np.asarray(v, dtype=float), (len(prompts),)))
    return Evaluation(items, {"concept": "x"})


def test_context_falls_as_concept_rises_holds_and_says_when_clip_disagrees():
    rng = np.random.default_rng(0)
    n = 24
    base = {"oracle_concept": 0.0, "oracle_context": 1.0, "clip_t_context": 60.0}
    ti = {"oracle_concept": 1.0, "oracle_context": (rng.random(n) < 0.3).astype(float),
          "clip_t_context": 50.0}
    r = F.context_vs_concept({"x": evaluation({F.CLASS_WORD_ROW: base, "textual_inversion": ti})}, n_boot=2000)
    assert r["holds"] and r["clip_agrees"]
    assert r["differences"]["oracle_concept"].mean == pytest.approx(1.0)
    assert r["differences"]["oracle_context"].mean == pytest.approx(np.mean(ti["oracle_context"]) - 1.0)
    # the context holds by the oracle while CLIP-T falls: fails, and the judges disagree
    kept = dict(ti, oracle_context=1.0)
    r = F.context_vs_concept({"x": evaluation({F.CLASS_WORD_ROW: base, "textual_inversion": kept})}, n_boot=2000)
    assert not r["holds"] and not r["clip_agrees"]


def test_tea_recovery_reads_the_method_rows():
    rows = {"dreambooth": {"oracle_context": 0.0, "oracle_concept": 1.0, "dino_i": 0.5, "clip_i": 50.0,
                           "clip_t_context": 40.0},
            "dreambooth TEA": {"oracle_context": 1.0, "oracle_concept": 0.5, "dino_i": 0.4, "clip_i": 45.0,
                               "clip_t_context": 45.0}}
    r = F.tea_recovery({"x": evaluation(rows)}, "dreambooth", n_boot=2000)
    assert r["holds"]
    assert r["differences"]["oracle_concept"].mean == pytest.approx(-0.5)
    assert r["differences"]["dino_i"].mean == pytest.approx(-0.1)


def test_trend_title_says_what_the_oracle_and_clip_show():
    live = {"oracle_concept": [0.0, 0.8], "oracle_context": [0.77, 0.79], "clip_t_context": [60.0, 55.0]}
    title = F.trend_title("<candy>", live)
    assert "the concept rises (0.00→0.80)" in title and "the context stays flat (0.77→0.79)" in title
    assert "CLIP-T context 60→55" in title and "CLIP and the oracle disagree" in title
    both = {"oracle_concept": [0.1, 0.9], "oracle_context": [0.8, 0.5], "clip_t_context": [60.0, 50.0]}
    t = F.trend_title("x", both)
    assert "the context falls" in t and "disagree" not in t
    assert F.trend_title("x", {"clip_t_context": [60.0, 50.0]}).endswith("(no ground truth at this scale)")


def test_findings_markdown_marks_failures():
    md = F.findings_markdown([F.Finding("i", "norm drift", True, summary="a"), F.Finding("ii", "spread", False),
                              F.Finding("iii", "context", None)])
    assert "| (i) | norm drift | holds | a |" in md and "**fails**" in md and "not measured" in md


def test_spread_by_position_adds_up_and_matches_scipy_at_the_class_word(shapesworld_pipeline):
    import torch
    from scipy.spatial.distance import pdist
    from persviz.tea.tracker import spread_by_position
    pipe = shapesworld_pipeline
    prompts = ["a {} on a black background", "a {} at the left next to a red cross on a white background",
               "a {} on a gray background", "a {} at the right next to a blue square on a navy background"]
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("circle</w>")]
    parts = spread_by_position(pipe, row.detach(), prompts, "<x>", "circle")
    assert parts["total"] == pytest.approx(parts["before"] + parts["at"] + parts["after"] + parts["padding"])
    # V* = the class word's row: the states are those of the prompts with the class word, encoded directly
    ids = pipe.tokenizer([p.format("circle") for p in prompts], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        h = pipe.text_encoder(ids)[0].double().reshape(len(prompts), -1).numpy()
    n = len(prompts)
    half_mean_pairwise = (pdist(h, "sqeuclidean").sum() * 2) / (2 * n * n)  # ordered pairs, i = j included
    assert parts["total"] == pytest.approx(half_mean_pairwise, rel=1e-6)
    # one prompt repeated: no spread anywhere
    same = spread_by_position(pipe, row.detach(), [prompts[0]] * 3, "<x>", "circle")
    assert same["total"] == pytest.approx(0.0, abs=1e-9)


def test_tea_table_images_are_kept_and_read_back(tmp_path):
    from persviz.tea.shapesworld_runs import cached_rows
    calls = []
    rng = np.random.default_rng(0)
    ims = {"dreambooth": rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8),
           "dreambooth TEA": rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)}
    make = lambda: calls.append(1) or ims
    first = cached_rows(tmp_path, "candy", "dreambooth", make)
    again = cached_rows(tmp_path, "candy", "dreambooth", make)
    assert len(calls) == 1 and set(again) == set(ims)
    for k in ims:
        np.testing.assert_array_equal(again[k], ims[k])
        assert again[k].dtype == np.uint8
    assert first is ims and (tmp_path / "candy" / "dreambooth.npz").is_file()
    assert cached_rows(None, "candy", "dreambooth", make) is ims and len(calls) == 2  # no folder: always made


def test_dominance_title_says_whether_the_varied_concept_takes_over():
    steps = [0, 100, 1000, 3000]
    assert F.dominance_title(steps, [13, 25, 32, 30], [-3, -1, -2, -9], "<spark>", "<candy>") == \
        "<spark> (fixed) stays above <candy> (varied) at every step: no takeover"
    assert F.dominance_title(steps, [30, 30, 30, 30], [10, 20, 35, 40], "a", "b") == "b (varied) overtakes a (fixed) from step 1000"
    assert F.dominance_title(steps, [30, 30, 30, 30], [10, 35, 20, 25], "a", "b") == "b (varied) is above a (fixed) at steps 100 only"
