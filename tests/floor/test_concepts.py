"""The shipped personal concepts: reference PNGs, evaluation prompts and what the oracle reads on them."""
import numpy as np
import pytest

from persviz.shapesworld.captions import caption_from
from persviz.shapesworld.concepts import (CONCEPTS, eval_prompts, get_concept, load_references, oracle_signature,
                                          pair_scene, reference_signature, render_references)
from persviz.shapesworld.render import render


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_shipped_references_are_the_renderer_output(name):
    shipped = load_references(name)
    assert 4 <= len(shipped) <= 8
    np.testing.assert_array_equal(shipped, render_references(name))


def test_three_concepts_each_a_specific_object_its_class_word_does_not_say():
    assert len(CONCEPTS) >= 3
    for c in CONCEPTS.values():
        # one color (the renderer's own texture shade), a texture and a size the class word (the shape) leaves open
        assert c.obj.pattern_color is None and c.obj.texture != "plain" and c.obj.size == "large"
        assert c.class_word == c.obj.shape and c.attributes() == {"shape": c.obj.shape, "color": c.obj.color,
                                                                  "texture": c.obj.texture, "size": "large"}
        assert c.description == f"a large {c.obj.color} {c.obj.texture} {c.obj.shape}"


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


def test_oracle_signature_is_the_recipe_the_oracle_reads_on_every_reference(oracle):
    for name, c in CONCEPTS.items():
        assert oracle_signature(oracle, name) == c.attributes()
        assert reference_signature(oracle, load_references(name)) == c.attributes()


def test_oracle_signature_refuses_references_the_oracle_reads_otherwise(oracle, tmp_path, monkeypatch):
    # references of another object (candy's) under checkers' name: a sentence, not a wrong ground truth
    import persviz.shapesworld.concepts as concepts
    monkeypatch.setattr(concepts, "load_references", lambda name: load_references("candy"))
    with pytest.raises(ValueError, match="reads checkers's reference images otherwise"):
        concepts.oracle_signature(oracle, "checkers")


def test_pair_scene_holds_both_concepts():
    s = pair_scene("checkers", "candy")
    assert s.obj.shape == "square" and s.second.shape == "circle" and s.second.size == "small"
    assert render(s).shape == (32, 32, 3)
