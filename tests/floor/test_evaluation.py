"""The evaluation protocol on hand-made images and toy judges: per-image scores as the metrics compute them,
grouping by prompt and seed, pairing, references checked, results written and read back."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from persviz.evaluation import Evaluation, combine, evaluate, fingerprint, interval_rows, score_per_image
from persviz.stats import bootstrap_mean, paired_difference


class ToyJudge:
    """Embeds an image as its mean colour (+1, normalized) and a text by its characters' codes."""

    def embed_images(self, images):
        x = torch.tensor(np.asarray(images, dtype=np.float32).mean((1, 2)) / 255.0 + 0.1)
        return F.normalize(x, dim=-1)

    def embed_texts(self, texts):
        codes = [[sum(ord(ch) for ch in t[i::3]) % 97 + 1.0 for i in range(3)] for t in texts]
        return F.normalize(torch.tensor(codes), dim=-1)


PROBES = [{"template": "a {} on a black background", "context": {}, "context_text": "on a black background"},
          {"template": "a {} at the left", "context": {}, "context_text": "at the left"}]


def images(seed, n=4):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def test_per_image_scores_are_the_metrics_of_each_image():
    judge, ims, refs = ToyJudge(), images(0), images(1, 3)
    s = score_per_image(ims, PROBES, "circle", refs, judge, dino=judge, repeats=2)
    e, r = judge.embed_images(ims), judge.embed_images(refs)
    assert np.allclose(s["clip_i"], 100 * (e @ r.T).mean(1).numpy(), atol=1e-5)
    assert np.allclose(s["dino_i"], (e @ r.T).mean(1).numpy(), atol=1e-6)
    t = judge.embed_texts(["a circle at the left"])[0]
    assert s["clip_t_full"][3] == pytest.approx(100 * max(float(e[3] @ t), 0), abs=1e-4)


def test_evaluate_groups_by_prompt_and_seed_and_pairs_conditions():
    judge, refs = ToyJudge(), images(9, 2)
    ev = evaluate({"without": images(0), "with": images(2)}, PROBES, "circle", refs, judge, repeats=2, seeds=[5, 6, 5, 6])
    prompts, groups, seeds = ev.grouped("with", "clip_i")
    assert prompts == ["a {} on a black background", "a {} at the left"] and seeds == [[5, 6], [5, 6]]
    summary = ev.summary(n_boot=500)
    assert summary["with"]["clip_i"] == bootstrap_mean(groups, n_boot=500)
    assert summary["with"]["clip_i"].n_images == 4 and summary["with"]["clip_i"].n_prompts == 2
    diffs = ev.compare("without", "with", n_boot=500)
    a = ev.grouped("without", "clip_t_context")[1]
    b = ev.grouped("with", "clip_t_context")[1]
    assert diffs["clip_t_context"].mean == paired_difference(a, b, n_boot=500).mean
    assert all(d.p_holm >= d.p for d in diffs.values())
    meta = ev.meta
    assert meta["image_size"] == [8, 8] and meta["references"]["count"] == 2
    assert meta["counts"]["with"] == {"prompts": 2, "images": 4} and meta["backbones"]["clip"] == "ToyJudge"
    rows = interval_rows(ev, n_boot=200)
    assert rows["with"]["n"] == "2 prompts, 4 images" and "[" in rows["with"]["clip_i"]


def test_round_trip(tmp_path):
    ev = evaluate({"a": images(0)}, PROBES, "circle", images(1, 2), ToyJudge(), repeats=2)
    back = Evaluation.load(ev.save(tmp_path / "ev.json"))
    assert back.items == ev.items and back.meta == ev.meta


def test_bad_inputs_are_named():
    judge, refs = ToyJudge(), images(1, 2)
    with pytest.raises(ValueError, match="condition 'b' has no image"):
        evaluate({"a": images(0), "b": np.zeros((0, 8, 8, 3), np.uint8)}, PROBES, "circle", refs, judge, repeats=2)
    with pytest.raises(ValueError, match="not candy's own reference set"):
        evaluate({"a": images(0)}, PROBES, "circle", refs, judge, repeats=2, concept="candy",
                 expected_references=fingerprint(images(7, 2)))
    with pytest.raises(ValueError, match="3 images for 2 probes x 2"):
        evaluate({"a": images(0, 3)}, PROBES, "circle", refs, judge, repeats=2)
    ev = evaluate({"a": images(0)}, PROBES, "circle", refs, judge, repeats=2)
    other = evaluate({"b": images(3, 2)}, PROBES, "circle", refs, judge, repeats=1)
    merged = Evaluation({**ev.items, **other.items}, ev.meta)
    with pytest.raises(ValueError, match="cannot be paired"):
        merged.compare("a", "b")
    with pytest.raises(KeyError, match="no condition 'c'"):
        merged.grouped("c", "clip_i")


def test_combine_prefixes_prompts_by_concept():
    judge = ToyJudge()
    one = evaluate({"x": images(0), "y": images(1)}, PROBES, "circle", images(5, 2), judge, repeats=2)
    two = evaluate({"x": images(2)}, PROBES, "square", images(6, 2), judge, repeats=2)
    both = combine({"candy": one, "spark": two})
    assert both.conditions == ["x"] and both.meta["counts"]["x"] == {"prompts": 4, "images": 8}
    assert both.items["x"]["prompt"][0] == "candy/a {} on a black background"
    assert set(both.meta["concepts"]) == {"candy", "spark"}


def test_a_template_drawn_twice_is_two_probes():
    probes = [PROBES[0], PROBES[1], PROBES[0]]
    ev = evaluate({"a": images(0, 6)}, probes, "circle", images(1, 2), ToyJudge(), repeats=2)
    prompts, groups, _ = ev.grouped("a", "clip_i")
    assert prompts == ["a {} on a black background", "a {} at the left", "a {} on a black background #2"]
    assert ev.summary(n_boot=100)["a"]["clip_i"].mean == pytest.approx(np.mean(ev.items["a"]["clip_i"]))
