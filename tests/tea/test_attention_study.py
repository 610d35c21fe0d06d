"""persviz.tea.attention_study: the measures against hand-set maps on rendered scenes (leak 0 on the object, a
uniform map's leak is 1 − its area), a real cell's images are the tea table's images (the collector changes
nothing), the gathered intervals and differences are the protocol's, and bad inputs fail clearly."""
import numpy as np
import pytest
import torch

from persviz.attention import AttentionMaps, word_positions
from persviz.evaluation import Evaluation
from persviz.shapesworld import Obj, Scene, render
from persviz.shapesworld.concepts import eval_prompts
from persviz.shapesworld.oracle import scene_reading
from persviz.shapesworld.regions import scene_regions
from persviz.stats import bootstrap_mean, paired_difference
from persviz.tea import attention_study as at
from persviz.tea.shapesworld_runs import GENERATION_SEED
from persviz.tea.study import generate_probes, learned_embedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TWO = {"template": "a {} at the left next to a blue square on a gray background",
       "context": {"background": "gray", "position": "left", "second": ("blue", "square")},
       "context_text": "at the left next to a blue square on a gray background"}
ONE = {"template": "a {} on a black background", "context": {"background": "black"},
       "context_text": "on a black background"}


def test_context_words_and_layout():
    assert at.context_words(TWO) == {"background": ["gray", "background"], "position": ["left"],
                                     "second": ["blue", "square"]}
    assert at.layout(TWO) == ("left", "right") and at.layout(ONE) == ("center", None)
    assert at.context_words(ONE) == {"background": ["black", "background"]}
    with pytest.raises(ValueError, match="'left' or 'right'"):
        at.layout({**TWO, "context": {**TWO["context"], "position": "center"}})


def _hand_maps(pipe, prompt, fill, res=(8, 8)):
    """AttentionMaps of one image whose every token has a uniform map (1), except those `fill` sets ({position: map
    [32, 32]}); the aggregate at 32x32 and one own resolution, area-averaged (the measures need no normalisation)."""
    tm = torch.full((1, 77, 32, 32), 1.0)
    for pos, m in fill.items():
        tm[0, pos] = torch.as_tensor(m, dtype=torch.float32)
    own = torch.nn.functional.adaptive_avg_pool2d(tm[0], res)[None]
    n = len(pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    mass = tm[0].mean((-2, -1))
    return AttentionMaps(words=[], keep="aggregate", size="latent", token_maps=tm, resolution_maps={res: own},
                         words_share=mass[1:1 + n].sum()[None], special={"start": mass[:1]}, prompts=[prompt],
                         resolution=(32, 32))


def test_measures_against_hand_set_maps(shapesworld_pipeline):
    pipe = shapesworld_pipeline
    scene = Scene(Obj("circle", "red", size="large"), background="gray", position="left", second=Obj("square", "blue"))
    img, reading = render(scene), scene_reading(scene)
    prompt = TWO["template"].format("circle")
    regions = scene_regions(img, "gray", ["left", "right"])
    pos = word_positions(pipe, prompt, ["circle", "square", "blue", "gray", "background"])
    # the class word looks at its object only; the second object's words at theirs, the background words at it
    fill = {pos["circle"][0]: 50 * regions["left"] + 1e-9, pos["square"][0]: 50 * regions["right"] + 1e-9,
            pos["blue"][0]: 50 * regions["right"] + 1e-9}
    maps = _hand_maps(pipe, prompt, fill)
    (r,) = at.image_measures(pipe, maps, img[None], [TWO], "circle", "circle", [reading])
    assert r["vstar_leak"] == pytest.approx(0, abs=1e-6)
    assert r["second_inside"] == pytest.approx(1, abs=1e-6)
    assert r["object_area"] == pytest.approx(regions["left"].mean())
    assert r["vstar_leak_excess"] == pytest.approx(-(1 - regions["left"].mean()), abs=1e-6)
    assert r["placed"] == 1.0
    # the background words have uniform maps: their share inside the background is its area (every resolution)
    assert r["background_inside"] == pytest.approx(regions["background"].mean(), rel=1e-4)
    mass = maps.token_maps[0].mean((-2, -1))
    words = float(maps.words_share[0])
    assert r["vstar_share"] == pytest.approx(float(mass[pos["circle"]].sum()) / words, rel=1e-5)
    ctx = sum(float(mass[p]) for w in ("left", "blue", "square", "gray", "background")
              for p in word_positions(pipe, prompt, [w])[w])
    assert r["context_share"] == pytest.approx(ctx / words, rel=1e-5)
    # a uniform map of V* leaks 1 minus its object's area (a hand-worked value); at 8x8 the fractional mask holds
    (u,) = at.image_measures(pipe, _hand_maps(pipe, prompt, {}), img[None], [TWO], "circle", "circle", [reading])
    assert u["vstar_leak"] == pytest.approx(1 - regions["left"].mean(), rel=1e-5)
    assert u["vstar_leak_8x8"] == pytest.approx(1 - regions["left"].mean(), rel=1e-5)
    assert u["vstar_leak_excess"] == pytest.approx(0, abs=1e-6)
    # the object missing from its slot: an empty region, leak 1, not placed
    empty = render(Scene(Obj("square", "blue"), background="gray", position="right"))
    (e,) = at.image_measures(pipe, _hand_maps(pipe, prompt, fill), empty[None], [TWO], "circle", "circle",
                             [scene_reading(Scene(Obj("square", "blue"), background="gray", position="right"))])
    assert e["vstar_leak"] == pytest.approx(1) and e["object_area"] == 0 and e["placed"] == 0
    with pytest.raises(ValueError, match="one of each per image"):
        at.image_measures(pipe, maps, np.stack([img, img]), [TWO], "circle", "circle", [reading])


def test_a_cell_generates_the_tea_tables_images(shapesworld_pipeline, oracle, monkeypatch):
    """The study's images are those of the TEA table (its probes, seeds 1000 + i), unchanged by the collector."""
    pipe = shapesworld_pipeline
    seen = []
    real = at.image_measures

    def keep(pipe_, maps, images, *rest):
        seen.append(images)
        return real(pipe_, maps, images, *rest)
    monkeypatch.setattr(at, "image_measures", keep)
    c = {"concept": "candy", "method": "textual_inversion", "step": 3000, "tea": False, "id": "x"}
    out = at.cell_measures(pipe, oracle, c, n_probes=2, repeats=1, steps=6)
    with at.loaded_cell(pipe, c, at.CONCEPTS_DIR):
        plain = generate_probes(pipe, eval_prompts("candy", 2, seed=1), "<candy>", 1, GENERATION_SEED, steps=6)
    np.testing.assert_array_equal(seen[0], plain)
    assert out["all"]["seed"] == [GENERATION_SEED, GENERATION_SEED + 1]
    assert out["two_object"]["prompt"] == [out["all"]["prompt"][1]]  # the odd probes have a second object
    assert all(0 <= v <= 1 for v in out["all"]["vstar_leak"])
    assert "<candy>" not in pipe.tokenizer.get_added_vocab()  # the snapshot is unloaded again
    with pytest.raises(ValueError, match="no snapshot at step 50"):
        at.cell_measures(pipe, oracle, {**c, "step": 50}, n_probes=1, repeats=1, steps=2)


def _fake_results(cells, rng):
    out = {}
    for c in cells:
        ids = [f"p{i}" for i in range(4) for _ in range(2)]
        shift = 0.2 if c["step"] == 3000 else 0.0
        out[c["id"]] = {"all": {"prompt": ids, "seed": [0, 1] * 4,
                                "vstar_leak": list(np.round(rng.uniform(0.4, 0.6, 8) + shift, 5))},
                        "two_object": None}
    return out


def test_gathered_intervals_and_differences_are_the_protocols():
    rng = np.random.default_rng(0)
    cells = at.study_cells(["candy", "spark"], steps=[0, 3000], methods=["textual_inversion"])
    assert [c["id"] for c in cells][:3] == ["candy_textual_inversion_step0_teaFalse",
                                            "candy_textual_inversion_step3000_teaFalse",
                                            "candy_textual_inversion_step3000_teaTrue"]  # no TEA at step 0
    results = _fake_results(cells, rng)
    study = at.gather_study(results, cells, {"probes": 4}, n_boot=500)
    ref, last = "textual_inversion step 0", "textual_inversion step 3000"
    pooled = np.array([[results[f"{n}_textual_inversion_step{s}_teaFalse"]["all"]["vstar_leak"]
                        for n in ("candy", "spark")] for s in (0, 3000)]).reshape(2, 8, 2)  # [step, prompt, seed]
    iv = bootstrap_mean(pooled[1], n_boot=500)
    got = study["all"]["intervals"][last]["vstar_leak"]
    assert got["mean"] == pytest.approx(iv.mean) and got["low"] == pytest.approx(iv.low)
    d = paired_difference(pooled[0], pooled[1], n_boot=500)
    got = study["all"]["differences"][f"{last} vs {ref}"]["vstar_leak"]
    assert got["mean"] == pytest.approx(d.mean) and got["p"] == pytest.approx(d.p)
    assert got["low"] > 0  # the planted +0.2 is found
    assert at.study_differences(study, ref, last)["vstar_leak"].mean == pytest.approx(d.mean)
    with pytest.raises(KeyError, match="no comparison"):
        at.study_differences(study, last, ref)
    curve = at.step_curve(study, "vstar_leak")
    assert list(curve["step"]) == [0, 3000] and curve["mean"][1] == pytest.approx(iv.mean)
    assert list(at.step_curve(study, "vstar_leak", with_tea=True)["step"]) == [3000]
    assert "two_object" not in study


def test_reading_and_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="persviz tea attention"):
        at.read_attention_study(tmp_path / "none.json")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a persviz attention study"):
        at.read_attention_study(tmp_path / "x.json")
    with pytest.raises(ValueError, match="unknown methods"):
        at.study_cells(["candy"], methods=["lora"])
    with pytest.raises(ValueError, match="needs the oracle"):
        at.run_attention_study(None, None, tmp_path / "w")
    cells = at.study_cells(["candy"], steps=[0, 3000], methods=["textual_inversion"])
    study = at.gather_study(_fake_results(cells, np.random.default_rng(1)), cells, {}, n_boot=200)
    path = tmp_path / "s.json"
    import json
    path.write_text(json.dumps(study))
    back = at.read_attention_study(path)
    assert isinstance(back["all"]["evaluations"]["candy"], Evaluation)
    with pytest.raises(KeyError, match="no 'nothing'"):
        at.step_curve(back, "nothing")
