"""The shipped personal concepts: reference PNGs, evaluation prompts and what the oracle reads on them."""
import numpy as np
import pytest

from persviz.shapesworld.captions import caption_from
from persviz.shapesworld.concepts import (CONCEPTS, eval_prompts, get_concept, load_references, oracle_signature,
                                          pair_scene, render_references)
from persviz.shapesworld.render import render


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_shipped_references_are_the_renderer_output(name):
    shipped = load_references(name)
    assert 4 <= len(shipped) <= 8
    np.testing.assert_array_equal(shipped, render_references(name))


def test_at_least_three_concepts_each_a_two_color_object():
    assert len(CONCEPTS) >= 3
    for c in CONCEPTS.values():
        assert c.obj.pattern_color is not None and c.obj.texture != "plain"


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_eval_prompts_name_a_context_the_references_do_not_show(name):
    c = get_concept(name)
    prompts = eval_prompts(name, n=12)
    assert len(prompts) == 12
    for e in prompts:
        assert "{}" in e["template"] and e["context"]["background"] not in c.backgrounds
        # the context text is exactly what the caption grammar writes for that context
        assert caption_from({"shape": c.class_word, **e["context"]}) == e["template"].format(c.class_word)


def test_unknown_concept_names_the_shipped_ones():
    with pytest.raises(KeyError, match="checkers"):
        get_concept("nope")


def test_oracle_signature_matches_its_reading_of_one_color_lookalikes(oracle):
    # the oracle reads the references' shape correctly; the color it reads is what it reads on the references
    for name, c in CONCEPTS.items():
        sig = oracle_signature(oracle, name)
        assert sig["shape"] == c.class_word


def test_pair_scene_holds_both_concepts():
    s = pair_scene("checkers", "candy")
    assert s.obj.shape == "square" and s.second.shape == "circle" and s.second.pattern_color is not None
    assert render(s).shape == (32, 32, 3)
