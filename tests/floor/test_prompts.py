"""The shipped prompt sets: counts, one `{}` each, ShapesWorld files reproducible and in ShapesWorld words."""
import json

import pytest

from persviz.paths import SHAPESWORLD_DIR
from persviz.prompts import (fill, load_prompt_set, prompt_set_names, prompts_dir, shapesworld_prompt_sets,
                             write_shapesworld_prompt_files)
from persviz.shapesworld.captions import world_words
from persviz.shapesworld.scene import SHAPES

SETS_OF_200 = ["shapesworld_contextual", "shapesworld_simple", "sd15_contextual", "sd15_simple"]


@pytest.mark.parametrize("name", SETS_OF_200)
def test_sets_have_200_unique_prompts_with_one_placeholder(name):
    prompts = load_prompt_set(name)
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert all(p.count("{}") == 1 and p == p.strip() and "  " not in p for p in prompts)


def test_contextual_and_simple_sets_do_not_overlap():
    for world in ("shapesworld", "sd15"):
        assert not set(load_prompt_set(f"{world}_contextual")) & set(load_prompt_set(f"{world}_simple"))


def test_shapesworld_files_are_the_function_output(tmp_path):
    sets = shapesworld_prompt_sets(n=200, seed=0)
    assert sets["contextual"] == load_prompt_set("shapesworld_contextual")
    assert sets["simple"] == load_prompt_set("shapesworld_simple")
    for path in write_shapesworld_prompt_files(tmp_path):
        assert path.read_bytes() == (prompts_dir() / path.name).read_bytes()
    assert shapesworld_prompt_sets(n=50, seed=1) == shapesworld_prompt_sets(n=50, seed=1)
    assert shapesworld_prompt_sets(n=50, seed=1)["contextual"] != shapesworld_prompt_sets(n=50, seed=2)["contextual"]


def test_shapesworld_contextual_prompts_name_context():
    context = ("at the", "in the center", "next to", "background")
    assert all(any(c in p for c in context) for p in load_prompt_set("shapesworld_contextual"))
    assert not any(any(c in p for c in context) for p in load_prompt_set("shapesworld_simple"))


def test_shapesworld_prompts_tokenize_to_whole_shapesworld_tokens():
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(SHAPESWORLD_DIR / "tokenizer")
    vocab = set(world_words())
    for name in ("shapesworld_contextual", "shapesworld_simple"):
        for shape in SHAPES:
            for prompt in fill(load_prompt_set(name), shape):
                words = prompt.split()
                assert set(words) <= vocab, prompt
                ids = tok(prompt, add_special_tokens=False).input_ids
                assert len(ids) == len(words) and tok.unk_token_id not in ids, prompt
                assert tok.convert_ids_to_tokens(ids) == [w + "</w>" for w in words], prompt


def test_tea_eval_prompts():
    celeba = load_prompt_set("tea_eval_celeba")
    assert len(celeba) == 17 and all(p.startswith("A photo of a {} wearing glasses and ") for p in celeba)
    table = json.loads((prompts_dir() / "tea_eval_customconcept101.json").read_text())
    assert sorted(table) == ["barn", "cat", "chair", "dog", "flower", "table", "teddybear", "tortoise", "woodenpot"]
    assert {c: len(v) for c, v in table.items() if len(v) != 14} == {"barn": 13, "flower": 13, "woodenpot": 13}
    assert all(p.count("{}") == 1 for v in table.values() for p in v)
    assert load_prompt_set("tea_eval_customconcept101/chair")[0] == "{} chair in snowy ice"
    parts = json.loads((prompts_dir() / "tea_eval_parts.json").read_text())
    assert [r["prompt"] for r in parts["celeba"]] == celeba
    assert {c: [r["prompt"] for r in v] for c, v in parts["customconcept101"].items()} == table
    assert "tea_eval_customconcept101/dog" in prompt_set_names()


def test_fill_and_unknown_names():
    assert fill(["a {} on a beach", "a photo of a {}"], "dog") == ["a dog on a beach", "a photo of a dog"]
    with pytest.raises(ValueError, match="placeholder"):
        fill(["no slot here"], "dog")
    with pytest.raises(KeyError, match="sd15_simple"):
        load_prompt_set("nonexistent")
    with pytest.raises(KeyError, match="barn"):
        load_prompt_set("tea_eval_customconcept101/unicorn")
