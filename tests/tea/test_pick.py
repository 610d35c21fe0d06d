"""The checkpoint picker (issue 26, docs/pick.md): its rules against hand-worked inputs and brute-force references,
the command end to end on a tiny concept folder, resume, --fast and bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from persviz.cli import main as cli_main
from persviz.errors import PersvizError
from persviz.shapesworld.concepts import CONCEPTS_DIR
from persviz.tea.pick_rules import (PickError, censored, collapse_step, pareto_front, predicted_step, recommend,
                                    spearman_interval, verdict)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the front


def brute_front(points):
    """A point is dominated when some other point is >= on both and > on one: every pair checked by hand."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = False
        for j, (u, v) in enumerate(points):
            if j != i and u >= x and v >= y and (u > x or v > y):
                dominated = True
        out.append(not dominated)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_the_front_is_the_brute_force_front(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 15))
    pts = rng.integers(0, 5, size=(n, 2)).astype(float)  # small integers: ties on one or both coordinates
    assert pareto_front(pts[:, 0], pts[:, 1]) == brute_front([tuple(p) for p in pts])


def test_the_front_on_a_hand_worked_case():
    # (1, 5) (3, 3) (5, 1) trade off; (2, 2) is below (3, 3); a copy of (3, 3) stays on the front
    assert pareto_front([1, 3, 5, 2, 3], [5, 3, 1, 2, 3]) == [True, True, True, False, True]


def test_the_front_refuses_nan_and_unequal_lengths():
    with pytest.raises(PickError, match="NaN"):
        pareto_front([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(PickError, match="one length"):
        pareto_front([1.0], [1.0, 2.0])


# ----------------------------------------------------------------------------- the rule


def test_the_rule_takes_the_earliest_step_within_the_best_interval_whose_context_holds():
    steps = [0, 100, 200, 300, 400]
    identity = [(0.0, 0.0, 0.1), (0.5, 0.4, 0.6), (0.8, 0.7, 0.9), (0.9, 0.75, 1.0), (0.85, 0.7, 0.95)]
    # step 0's context [0.6, 0.9]; step 200's high 0.55 < 0.6: collapsed; 300's high 0.65 holds
    context = [(0.8, 0.6, 0.9), (0.8, 0.6, 0.9), (0.4, 0.3, 0.55), (0.5, 0.4, 0.65), (0.3, 0.2, 0.4)]
    rec = recommend(steps, identity, context)
    # best = 300 (0.9); floor = its low 0.75; eligible by identity: 200 (0.8), 300 (0.9), 400 (0.85);
    # context: 200 and 400 collapsed -> 300
    assert rec == {"step": 300, "best": 300, "eligible": [300], "collapsed": False}


def test_the_rule_prefers_an_earlier_step_as_good_as_the_best():
    steps = [0, 1, 2]
    identity = [(0.1, 0.0, 0.2), (0.78, 0.6, 0.9), (0.8, 0.7, 0.9)]
    context = [(0.5, 0.4, 0.6)] * 3
    assert recommend(steps, identity, context)["step"] == 1  # 0.78 >= best's low 0.7


def test_the_rule_falls_back_to_the_best_when_every_good_step_collapsed():
    steps = [0, 10, 20]
    identity = [(0.0, 0.0, 0.0), (0.2, 0.1, 0.3), (0.9, 0.8, 1.0)]
    context = [(0.9, 0.8, 1.0), (0.9, 0.8, 1.0), (0.1, 0.0, 0.2)]
    assert recommend(steps, identity, context) == {"step": 20, "best": 20, "eligible": [], "collapsed": True}


def test_the_rule_breaks_ties_of_the_best_toward_the_earlier_step_and_reads_mappings():
    steps = [0, 5, 9]
    identity = [{"mean": 0, "low": 0, "high": 0}, {"mean": 0.5, "low": 0.5, "high": 0.5},
                {"mean": 0.5, "low": 0.5, "high": 0.5}]
    context = [{"mean": 1, "low": 1, "high": 1}] * 3
    assert recommend(steps, identity, context)["best"] == 5


def test_the_rule_refuses_steps_without_step_0_or_out_of_order():
    with pytest.raises(PickError, match="step 0"):
        recommend([100, 200], [(1, 0, 2)] * 2, [(1, 0, 2)] * 2)
    with pytest.raises(PickError, match="increase"):
        recommend([0, 200, 100], [(1, 0, 2)] * 3, [(1, 0, 2)] * 3)
    with pytest.raises(PickError, match="one per step"):
        recommend([0, 100], [(1, 0, 2)], [(1, 0, 2)] * 2)


# ----------------------------------------------------------------------------- the collapse step


def test_the_collapse_step_is_the_first_interval_wholly_below_step_0s():
    steps = [0, 50, 100, 150]
    context = [(0.6, 0.4, 0.8), (0.5, 0.3, 0.7), (0.3, 0.2, 0.4), (0.1, 0.0, 0.2)]
    assert collapse_step(steps, context) == 150  # 100's high 0.4 touches step 0's low 0.4: not wholly below
    context[2] = (0.3, 0.2, 0.39)
    assert collapse_step(steps, context) == 100


def test_no_collapse_step_when_every_interval_overlaps():
    assert collapse_step([0, 1, 2], [(0.5, 0.4, 0.6), (0.45, 0.35, 0.5), (0.9, 0.8, 1.0)]) is None


# ----------------------------------------------------------------------------- the signal and the correlation


def test_the_predicted_step_is_the_first_beyond_the_tail():
    assert predicted_step([0, 50, 100, 150], [96.0, 90.0, 95.0, 95.5], 95) == 150  # step 0 never counts; 95 is not beyond
    assert predicted_step([0, 50], [60.0, 94.0], 95) is None
    assert predicted_step([0, 50, 100], [60.0, None, 99.0], 95) == 50  # a NaN row counts as beyond
    assert censored(None, 450) == 450 and censored(100, 450) == 100


def test_the_rank_correlation_is_scipys_and_its_interval_holds_it():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 8, 20) * 50
    y = x + rng.integers(-100, 100, 20)
    res = spearman_interval(x, y, n_boot=2000)
    assert res["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert res["low"] <= res["rho"] <= res["high"] and res["n"] == 20 and res["n_boot"] == 2000
    # a percentile bootstrap by hand with the same draws
    draws = []
    g = np.random.default_rng(0)
    while len(draws) < 2000:
        i = g.integers(0, 20, 20)
        if np.ptp(x[i]) and np.ptp(y[i]):
            draws.append(spearmanr(x[i], y[i]).statistic)
    assert res["low"] == pytest.approx(np.quantile(draws, 0.025)) and res["high"] == pytest.approx(np.quantile(draws, 0.975))


def test_a_constant_side_has_no_correlation():
    res = spearman_interval([450] * 5, [1, 2, 3, 4, 5])
    assert res["rho"] != res["rho"] and res["n_boot"] == 0


def test_the_verdict_needs_rho_the_interval_and_enough_collapses():
    good = {"rho": 0.7, "low": 0.2, "high": 0.9, "n": 20}
    assert verdict(good, 6)["predicts"]
    assert not verdict(good, 4)["predicts"]  # too few collapses
    assert not verdict({**good, "low": -0.1}, 6)["predicts"]
    assert not verdict({**good, "rho": 0.4}, 6)["predicts"]
    assert not verdict({**good, "rho": float("nan")}, 6)["predicts"]


# ----------------------------------------------------------------------------- the command end to end


@pytest.fixture
def tiny_concept(tmp_path):
    """candy's concept folder with two Textual Inversion snapshots and the DreamBooth-LoRA run (one checkpoint and
    the final weights), no class images."""
    src, dst = CONCEPTS_DIR / "candy", tmp_path / "candy"
    (dst / "textual_inversion").mkdir(parents=True)
    shutil.copytree(src / "images", dst / "images")
    shutil.copytree(src / "dreambooth", dst / "dreambooth", ignore=shutil.ignore_patterns("class_images"))
    for f in ("config.json", "learned_embeds-steps-100.safetensors", "learned_embeds-steps-200.safetensors"):
        shutil.copy(src / "textual_inversion" / f, dst / "textual_inversion" / f)
    record = json.loads((src / "concept.json").read_text())
    record["runs"].pop("custom_diffusion")
    (dst / "concept.json").write_text(json.dumps(record))
    return dst


def _pick(folder, *extra):
    return cli_main(["pick", str(folder), "--every", "100", "--probes", "3", "--steps", "2", "--threads", "1",
                     "--no-progress", *extra])


def test_the_command_end_to_end_and_resume(tiny_concept, capsys):
    result = _pick(tiny_concept)
    out = capsys.readouterr().out
    pick_dir = tiny_concept / "pick"
    saved = json.loads((pick_dir / "pick.json").read_text())
    assert set(saved["methods"]) == {"textual_inversion", "dreambooth"}
    ti, db = saved["methods"]["textual_inversion"], saved["methods"]["dreambooth"]
    assert ti["steps"] == [0, 100, 200] and db["steps"] == [0, 400, 800]  # DreamBooth: checkpoint-400 and the final 800
    # each mean is the mean of the cell's per-image scores; step 0 is one cell shared by the methods
    for m, s in (("textual_inversion", ti), ("dreambooth", db)):
        for k, step in enumerate(s["steps"]):
            name = "step0" if step == 0 else f"{m}_step{step}"
            cell = json.loads((pick_dir / "cells" / f"{name}.json").read_text())["result"]
            for metric in ("clip_i", "clip_t_context", "oracle_concept", "oracle_context"):
                assert s["intervals"][metric][k]["mean"] == pytest.approx(np.mean(cell["scores"][metric]))
                assert len(cell["scores"][metric]) == 3
        # the recommendation is the rule applied to the saved intervals; the front the brute-force one
        for judge, j in s["judges"].items():
            ident, ctx = s["intervals"][j["identity"]], s["intervals"][j["context"]]
            assert j["recommendation"]["step"] == recommend(s["steps"], ident, ctx)["step"]
            pts = [(i["mean"], c["mean"]) for i, c in zip(ident, ctx)]
            assert j["front"] == [st for st, f in zip(s["steps"], brute_front(pts)) if f]
        assert s["clip_pick_on_oracle_front"] == (s["judges"]["clip"]["recommendation"]["step"]
                                                  in s["judges"]["oracle"]["front"])
    # the text-space signal: step 0 is the class word (ratio 1, cos 1, drift 0); Textual Inversion's rows drift
    assert ti["signal"]["0"]["ratio"] == pytest.approx(1.0) and ti["signal"]["0"]["drift"] == 0.0
    assert ti["signal"]["200"]["ratio"] > 1.0 and db["signal"]["800"]["drift"] > 0.0
    for m in ("textual_inversion", "dreambooth"):
        for kind in ("tradeoff", "strips"):
            assert (pick_dir / f"{m}_{kind}.png").is_file()
            assert json.loads((pick_dir / f"{m}_{kind}.json").read_text())["method"] == m
    assert "keep step" in out and result["methods"]["dreambooth"]["steps"] == [0, 400, 800]

    # resume: nothing is recomputed; a removed cell alone is
    cells = sorted((pick_dir / "cells").glob("*.json"))
    stamps = {p.name: p.stat().st_mtime_ns for p in cells if p.name != "manifest.json"}
    gone = pick_dir / "cells" / "textual_inversion_step200.json"
    gone.unlink()
    again = _pick(tiny_concept)
    assert again["methods"] == result["methods"]
    for p in (pick_dir / "cells").glob("*.json"):
        if p.name in stamps and p.name != gone.name:
            assert p.stat().st_mtime_ns == stamps[p.name], p.name
    assert gone.is_file()


def test_fast_recommends_only_when_the_experiment_predicts(tiny_concept, shapesworld_pipeline):
    from persviz.tea.pick import fast_pick, fast_text
    predicts = {"verdict": {"predicts": True, "why": "x"}, "correlation": {"rho": 0.8, "low": 0.5, "high": 0.9, "n": 20},
                "done": 20}
    res = fast_pick(tiny_concept, shapesworld_pipeline, ["textual_inversion", "dreambooth"], every=100,
                    n_probes=3, warning=predicts)
    ti = res["methods"]["textual_inversion"]
    steps = [r["step"] for r in ti["signal"]]
    pred = ti["predicted_collapse"]
    beyond = [r["step"] for r in ti["signal"] if r["step"] > 0 and r["percentile"] > 95]
    assert pred == (beyond[0] if beyond else None)
    assert ti["recommendation"] == max([k for k in steps if k > 0 and (pred is None or k < pred)], default=None)
    assert res["methods"]["dreambooth"]["recommendation"] is None
    fails = {**predicts, "verdict": {"predicts": False, "why": "only 2 of 20 runs collapsed"}}
    res = fast_pick(tiny_concept, shapesworld_pipeline, ["textual_inversion"], every=100, n_probes=3, warning=fails)
    assert res["methods"]["textual_inversion"]["recommendation"] is None
    assert "does not predict" in fast_text(res) and "only 2 of 20" in fast_text(res)
    # the percentile is the share of vocabulary rows with a smaller norm
    from persviz.families import text_stack
    from persviz.tea.inspect_file import vocabulary
    from persviz.trainers import load_snapshot_embedding
    text = text_stack(shapesworld_pipeline).primary
    norms = vocabulary(text.tokenizer, text.encoder)[1].norm(dim=-1)
    v = load_snapshot_embedding(tiny_concept / "textual_inversion" / "learned_embeds-steps-200.safetensors").reshape(-1)
    row = next(r for r in res["methods"]["textual_inversion"]["signal"] if r["step"] == 200)
    assert row["percentile"] == pytest.approx(100.0 * float((norms < v.float().norm()).float().mean()))


def test_the_drift_is_the_relative_frobenius_distance():
    from persviz.tea.pick import drift
    base = torch.ones(2, 3, 4, dtype=torch.float64)
    states = base.clone()
    states[0] *= 2.0  # |H - H0| = |H0| for the first prompt, 0 for the second
    assert drift(states, base) == pytest.approx(0.5)
    with pytest.raises(PickError):
        drift(states[:, :2], base)


def test_bad_input_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="neither a concept folder nor a shipped concept; pass a folder"):
        cli_main(["pick", str(tmp_path / "nowhere")])
    from persviz.commands.pick import concept_folder
    with pytest.raises(PersvizError):
        concept_folder(str(tmp_path / "nowhere"))


def test_recommended_strips_reads_the_recommended_and_the_last_snapshot(tiny_concept, monkeypatch):
    """The strips of notebook 05: the recommended step's snapshot file above the last one's (step 0: the class word,
    no snapshot), on the pick's probes."""
    from persviz.concept_folder import read_concept
    from persviz.families import assemble_pipeline
    from persviz.tea import pick as picker

    calls = []

    def images(self, method, path, n=picker.STRIP):
        calls.append((method, None if path is None else Path(path).name, len(self.probes)))
        return np.zeros((n, 8, 8, 3), np.uint8)

    monkeypatch.setattr(picker.CheckpointSetup, "images", images)
    concept = read_concept(tiny_concept)
    pipe = assemble_pipeline(concept.model)
    for rec, want in ((100, ("textual_inversion", "learned_embeds-steps-100.safetensors")), (0, (None, None))):
        calls.clear()
        summary = {"judges": {"clip": {"recommendation": {"step": rec}}}, "steps": [0, 100, 200]}
        fig = picker.recommended_strips(pipe, concept, summary, {"steps": 2, "guidance": 4.0}, n_probes=3)
        assert [c[:2] for c in calls] == [want, ("textual_inversion", "learned_embeds-steps-200.safetensors")]
        assert all(c[2] == 3 for c in calls)
        assert fig.axes[0].get_title() == "textual_inversion: recommended vs last"
