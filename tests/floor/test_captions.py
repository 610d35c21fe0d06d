import numpy as np
import pytest
from transformers import CLIPTokenizer

from persviz.paths import SHAPESWORLD_DIR
from persviz.shapesworld import Obj, Scene, caption, caption_from
from persviz.shapesworld.captions import world_words
from persviz.shapesworld.tokenizer import learn_merges

SCENE = Scene(Obj("circle", "red", "striped", "small"), "beige", "left", Obj("square", "blue"))


def test_terse_and_full_captions():
    assert caption(SCENE, level="terse") == "a red circle"
    assert caption(SCENE, level="full") == (
        "a small red striped circle at the left next to a blue square on a beige background")
    assert caption_from({"shape": "diamond", "color": "orange"}) == "an orange diamond"


def test_random_captions_always_name_the_shape_and_only_true_attributes():
    rng = np.random.default_rng(0)
    words_true = set(caption(SCENE, level="full").split())
    for _ in range(200):
        c = caption(SCENE, rng)
        assert "circle" in c.split()
        assert set(c.split()) - {"photo", "of", "an", "image", "picture"} <= words_true


def test_caption_from_refuses_unknown_attributes():
    with pytest.raises(ValueError, match="shape"):
        caption_from({"color": "red"})
    with pytest.raises(ValueError, match="unknown color"):
        caption_from({"shape": "circle", "color": "teal"})
    with pytest.raises(ValueError, match="unknown attribute"):
        caption_from({"shape": "circle", "mood": "happy"})


def test_bpe_training_makes_every_word_one_symbol():
    merges = learn_merges(["red", "reed", "bed"])
    assert ("r", "e") in merges or ("e", "d</w>") in merges
    assert len(merges) >= 4
    # worked by hand: most frequent pair first, ties broken alphabetically, until each word is one symbol
    assert merges == [("e", "d</w>"), ("b", "ed</w>"), ("e", "ed</w>"), ("r", "ed</w>"), ("r", "eed</w>")]


def test_shipped_tokenizer_is_a_clip_tokenizer_with_whole_world_words():
    tok = CLIPTokenizer.from_pretrained(SHAPESWORLD_DIR / "tokenizer")
    for w in world_words():
        assert tok.tokenize(w) == [w + "</w>"], w
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id
    assert tok.tokenize("unicorn") and tok.unk_token not in tok.tokenize("unicorn")  # byte-level fallback
    n = len(tok)
    tok.add_tokens("<v*>")
    assert len(tok) == n + 1 and "<v*>" in tok.tokenize("a <v*> on a gray background")
