"""The fixes side by side (issue 26, docs/pick.md §5): a fix at its identity knobs gives the untouched images, the
differences are the per-image differences by hand, the ranking is the best score by hand, --write bakes Eq. 1 into
a file of the run's format, pooling over runs, the command end to end on a tiny concept folder."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from persviz.cli import main as cli_main
from persviz.concept_folder import read_concept
from persviz.embedding_files import read_embedding_file
from persviz.evaluation import Evaluation
from persviz.families import text_stack
from persviz.shapesworld.concepts import CONCEPTS_DIR
from persviz.tea.adjust import slerp_adjust
from persviz.tea.pick import CheckpointSetup
from persviz.tea.repair import NONE, Fix, Repairer, checkpoint_at, fixes_for, pooled
from persviz.tea.pick_rules import PickError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_ti(tmp_path):
    """candy's concept folder with two Textual Inversion snapshots only."""
    src, dst = CONCEPTS_DIR / "candy", tmp_path / "candy"
    (dst / "textual_inversion").mkdir(parents=True)
    shutil.copytree(src / "images", dst / "images")
    for f in ("config.json", "learned_embeds-steps-100.safetensors", "learned_embeds-steps-200.safetensors"):
        shutil.copy(src / "textual_inversion" / f, dst / "textual_inversion" / f)
    record = json.loads((src / "concept.json").read_text())
    record["runs"] = {"textual_inversion": record["runs"]["textual_inversion"]}
    (dst / "concept.json").write_text(json.dumps(record))
    return dst


def test_the_fixes_of_each_method():
    names = {m: [f.name for f in fixes_for(m)] for m in ("textual_inversion", "dreambooth", "custom_diffusion")}
    assert names["textual_inversion"] == names["custom_diffusion"] == ["TEA token", "TEA prompt", "rescale",
                                                                       "adaptive TEA"]
    assert names["dreambooth"] == ["TEA prompt", "rescale"]  # no token row to adjust


def test_a_fix_at_its_identity_knobs_gives_the_untouched_images(tiny_ti, shapesworld_pipeline, clip_eval):
    concept = read_concept(tiny_ti)
    setup = CheckpointSetup(shapesworld_pipeline, concept, clip_eval, None, None, 2, {"steps": 2, "guidance": 4.0})
    step, path = checkpoint_at(concept, "textual_inversion", None)
    assert step == 200
    r = Repairer(setup, "textual_inversion", path)
    none = r.images(None, None)
    # the rescale at scale 0 keeps |V*| (Eq. 1: m = |v|, rotation 0): the same row up to float64 round-off, the
    # same images up to one level of 255
    same = r.images(Fix("rescale", "rescale", "scale", (0.0,)), 0.0)
    assert np.abs(same.astype(int) - none.astype(int)).max() <= 1
    # so does prompt-level TEA at rotation 0, scale 0 (Eq. 2 is the identity there)
    same = r.images(Fix("TEA prompt", "prompt", "rotation", (0.0,)), 0.0)
    assert np.abs(same.astype(int) - none.astype(int)).max() <= 1
    # a real fix changes them
    assert not np.array_equal(r.images(Fix("rescale", "rescale", "scale", (1.0,)), 1.0), none)
    with pytest.raises(PickError, match="no checkpoint at step 150"):
        checkpoint_at(concept, "textual_inversion", 150)


def test_the_command_end_to_end_with_write(tiny_ti, shapesworld_pipeline, capsys):
    result = cli_main(["repair", str(tiny_ti), "--probes", "2", "--steps", "2", "--threads", "1", "--no-progress",
                       "--write"])
    rdir = tiny_ti / "repair"
    saved = json.loads((rdir / "repair.json").read_text())
    r = saved["methods"]["textual_inversion"]
    assert r["step"] == 200
    ev = Evaluation.from_json(r["evaluation"])
    assert set(ev.conditions) == {NONE, "TEA token rotation 0.1", "TEA token rotation 0.2", "TEA token rotation 0.4",
                                  "TEA prompt rotation 0.1", "TEA prompt rotation 0.2", "TEA prompt rotation 0.4",
                                  "rescale scale 0.5", "rescale scale 1", "adaptive TEA target 0.9",
                                  "adaptive TEA target 1"}
    # each difference is the mean of the per-image differences (one seed per probe), paired by seed
    for cond, d in r["differences"].items():
        for metric in ("oracle_context", "clip_t_context", "oracle_concept", "clip_i"):
            a, b = ev.items[NONE], ev.items[cond]
            assert a["seed"] == b["seed"] and a["prompt"] == b["prompt"]
            assert d[metric]["mean"] == pytest.approx(np.mean(np.subtract(b[metric], a[metric])))
            assert d[metric]["low"] <= d[metric]["mean"] <= d[metric]["high"]
    # the ranking: each fix at the knob with the highest context + identity difference, best fix first
    for judge, (ctx, ident) in {"oracle": ("oracle_context", "oracle_concept"), "clip": ("clip_t_context", "clip_i")}.items():
        by_hand = {}
        for cond, d in r["differences"].items():
            fix = cond.rsplit(" ", 2)[0]
            by_hand[fix] = max(by_hand.get(fix, -np.inf), d[ctx]["mean"] + d[ident]["mean"])
        ranking = r["ranking"][judge]
        assert [x["fix"] for x in ranking] == sorted(by_hand, key=lambda f: -by_hand[f])
        assert [x["score"] for x in ranking] == pytest.approx(sorted(by_hand.values(), reverse=True))
    # --write: the first-ranked token-level fix (by the oracle) baked into a file of the run's format
    w = saved["written"]["textual_inversion"]
    first = next(x for x in r["ranking"]["oracle"] if x["fix"] in ("TEA token", "rescale"))
    assert w["fix"] == first["fix"]
    fixed = read_embedding_file(w["written"])
    source = read_embedding_file(tiny_ti / "textual_inversion" / "learned_embeds-steps-200.safetensors")
    assert fixed.format == source.format and fixed.dtype == source.dtype
    c = text_stack(shapesworld_pipeline).primary.word_row("circle")
    expected = slerp_adjust(source.rows.double(), c.double(), w["rotation"], w["scale"])
    assert np.allclose(fixed.rows.double().numpy(), expected.numpy(), atol=1e-5)
    assert (rdir / "textual_inversion_fixes.png").is_file() and (rdir / "textual_inversion_fixes.json").is_file()
    assert "ranks" in capsys.readouterr().out and result["methods"]["textual_inversion"]["step"] == 200

    # pooled over two runs (the same run twice under two names): the pooled difference is the mean over both
    other = json.loads(json.dumps(saved))
    other["concept"]["name"] = "candy2"
    pool = pooled([saved, other])
    for cond, d in r["differences"].items():
        assert pool["differences"][cond]["oracle_context"]["mean"] == pytest.approx(d["oracle_context"]["mean"])
        assert pool["differences"][cond]["runs"] == ["candy/textual_inversion", "candy2/textual_inversion"]
    assert [x["fix"] for x in pool["ranking"]["oracle"]] == [x["fix"] for x in r["ranking"]["oracle"]]


def test_a_prompt_level_method_writes_nothing_and_says_why():
    from persviz.tea.repair import write_fix
    out = write_fix(None, "dreambooth", (400, None), [], None, None)
    assert out["written"] is None and "prompt level" in out["why"]
