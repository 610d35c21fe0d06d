"""persviz.shapesworld.concept_checks and world_concepts: the recipe, 'finds', the intervals against hand-worked
values, and the oracle against the renderer on the world concepts."""
import numpy as np
import pytest

from persviz.shapesworld import Obj, Scene, render_batch
from persviz.shapesworld.concept_checks import (PLAIN_TEMPLATES, description, finds, found, oracle_accuracy,
                                                plain_prompts, recipe_attributes, render_instances, summarize_rate,
                                                wilson)
from persviz.shapesworld.concepts import TWO_COLOR_CONCEPTS
from persviz.shapesworld.world_concepts import (WORLD_CONCEPTS, WORLD_PAIRS, get_world_concept,
                                                render_world_references, world_recipe)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Z = 1.959963984540054


def obj_reading(shape="square", color="yellow", texture="checkered", size="large"):
    return {"shape": shape, "color": color, "texture": texture, "size": size}


def test_wilson_hand_worked():
    # k = 0: upper bound z^2 / (n + z^2); k = n: lower bound n / (n + z^2); 5 of 10: the textbook [0.2366, 0.7634]
    assert wilson(0, 10) == pytest.approx((0.0, Z ** 2 / (10 + Z ** 2)))
    assert wilson(64, 64)[0] == pytest.approx(64 / (64 + Z ** 2))
    assert wilson(64, 64)[1] == 1.0
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_summarize_rate_takes_the_lower_bound_of_both_intervals():
    every = summarize_rate(np.ones((8, 8), bool), n_boot=500)
    assert every.rate == 1.0 and every.boot_low == 1.0  # the bootstrap cannot move off an all-hit sample
    assert every.low == pytest.approx(64 / (64 + Z ** 2))  # so Wilson's bound decides
    assert every.meets(0.8, 0.7)
    hits = np.zeros((8, 8), bool)
    hits[:, :5] = True  # 40 / 64
    s = summarize_rate(hits, n_boot=500)
    assert (s.rate, s.k, s.n, s.n_prompts) == (40 / 64, 40, 64, 8)
    assert s.low <= s.wilson_low and not s.meets(0.8, 0.7)


def test_finds_needs_every_attribute_on_one_object():
    recipe = obj_reading()
    r = {"background": "white", "left": None, "center": None, "right": obj_reading()}
    assert finds(r, recipe)
    assert not finds({**r, "right": obj_reading(size="small")}, recipe)
    split = {"background": "white", "left": obj_reading(color="red"), "center": None,
             "right": obj_reading(texture="plain")}  # color on one object, texture on the other
    assert not finds(split, recipe)
    assert not finds({"background": "white", "left": None, "center": None, "right": None}, recipe)


def test_recipe_description_and_prompts():
    obj = Obj("triangle", "orange", "dotted", "large")
    assert recipe_attributes(obj) == {"shape": "triangle", "color": "orange", "texture": "dotted", "size": "large"}
    assert description(obj) == "large orange dotted triangle"
    assert description(Obj("circle", "red")) == "small red circle"
    with pytest.raises(ValueError, match="two-color"):
        recipe_attributes(TWO_COLOR_CONCEPTS["candy"].obj)  # persviz 0.2's two-color concepts: no recipe to read
    prompts = plain_prompts("<candy>")
    assert len(prompts) == len(PLAIN_TEMPLATES) == 8 and prompts[0] == "a photo of a <candy>"
    assert "a <candy> on a white background" in prompts


def test_render_instances_cover_backgrounds_and_positions():
    obj = get_world_concept("candy").obj
    images, slots = render_instances(obj, [0, 1])
    assert images.shape == (2 * 5 * 3, 32, 32, 3) and slots.count("center") == 10
    again, _ = render_instances(obj, [0, 1])
    assert np.array_equal(images, again)  # seeded
    two, slots2 = render_instances(obj, [0], second=True)
    assert set(slots2) == {"left", "right"} and len(two) == 10


@pytest.mark.parametrize("name", sorted(WORLD_CONCEPTS))
def test_the_oracle_reads_every_world_concept(oracle, name):
    acc = oracle_accuracy(oracle, get_world_concept(name).obj, seeds=range(4))
    assert all(acc[k]["rate"] >= 0.95 for k in ("shape", "color", "texture", "size", "found")), acc
    refs = render_world_references(name)
    assert found(oracle, refs, world_recipe(name)).all()


def test_found_fails_on_another_object(oracle):
    recipe = world_recipe("checkers")
    wrong = [Obj("square", "orange", "checkered", "large"), Obj("square", "yellow", "striped", "large"),
             Obj("square", "yellow", "checkered", "small"), Obj("diamond", "yellow", "checkered", "large")]
    images = render_batch([Scene(o, "white") for o in wrong], seed=0)
    assert not found(oracle, images, recipe).any()


def test_world_concepts_are_one_color_and_the_pair_differs():
    for name, c in WORLD_CONCEPTS.items():
        assert c.obj.pattern_color is None and c.name == name and c.class_word == c.obj.shape
        assert len(render_world_references(name)) == 6
    for a, b in WORLD_PAIRS:
        oa, ob = get_world_concept(a).obj, get_world_concept(b).obj
        assert oa.shape != ob.shape and oa.color != ob.color
    with pytest.raises(KeyError, match="world concepts"):
        get_world_concept("nothing")


def test_the_screen_covers_every_large_textured_one_color_object(monkeypatch):
    from persviz.shapesworld import world_concepts as wc
    seen = {}
    monkeypatch.setattr(wc, "screen_candidates", lambda pipe, oracle, objs, seeds, control, progress: seen.update(
        objs=objs, seeds=seeds, control=control) or [])
    wc.screen_world(None, None)
    objs = seen["objs"]
    assert len(objs) == len(set(objs)) == 5 * 8 * 3
    assert all(o.size == "large" and o.texture != "plain" and o.pattern_color is None for o in objs)
    assert not set(seen["seeds"]) & set(seen["control"]) and not set(seen["seeds"]) & set(wc.CHECK_SEEDS)


def test_closest_object_is_the_one_nearest_the_recipe():
    from persviz.shapesworld.concept_checks import closest_object
    recipe = obj_reading()
    near, far = obj_reading(color="red"), obj_reading(shape="circle", color="red", texture="plain")
    assert closest_object({"background": "gray", "left": far, "center": None, "right": near}, recipe) == near
    assert closest_object({"background": "gray", "left": None, "center": None, "right": None}, recipe) is None


def test_prompt_losses_prefer_the_true_description(shapesworld_pipeline):
    from persviz.shapesworld.concept_checks import prompt_losses
    images = render_batch([Scene(Obj("circle", "red", "plain", "large"), bg) for bg in ("white", "gray")], seed=0)
    prompts = ["a large red circle", "a large blue square", "a large red circle"]
    losses = prompt_losses(shapesworld_pipeline, images, prompts, n_draws=64)
    assert losses.shape == (3, 64) and np.array_equal(losses[0], losses[2])  # the same draws for every prompt
    assert losses[0].mean() < losses[1].mean()
