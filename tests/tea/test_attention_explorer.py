"""AttentionExplorer driven without a browser: generate before/after TEA once, then the word picker and the layer and
step sliders redraw from the kept maps (what is shown equals AttentionMaps.view), errors are shown, not raised."""
import numpy as np
import pytest

from persviz.attention import attention_maps, content_words, prompt_words
from persviz.attention_plots import overlay_rgb
from persviz.tea.attention_explorer import ALL, AttentionExplorer, make_attention_maps_fn
from persviz.widgets import png_bytes

from tests.helpers import random_vector

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "a <cat> on a gray background"


def test_prompt_words():
    assert prompt_words("a <cat> on a red rug.") == ["a", "<cat>", "on", "red", "rug"]
    assert prompt_words("  ") == []
    assert content_words("a photo of <cat> on a red rug") == ["<cat>", "red", "rug"]


def test_generate_then_pick_words_layers_and_steps(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    pipe.load_textual_inversion({"<cat>": 4 * random_vector(3)})
    calls = []
    real = make_attention_maps_fn(pipe, "<cat>", "square", steps=3)

    def counted(prompt, seed, with_tea):
        calls.append(with_tea)
        return real(prompt, seed, with_tea)
    ex = AttentionExplorer(counted, prompt=PROMPT, seed=1)
    assert ex.button.click() is None and ex.error is None, ex.error
    assert calls == [False, True]
    assert list(ex.word.options) == ["a", "<cat>", "on", "gray", "background"] and ex.word.value == "<cat>"
    before_maps = ex.runs["before"][1]
    assert ex.layer.max == before_maps.n_layers - 1 and ex.step.max == 2
    np.testing.assert_allclose(ex.last["maps"]["before"], before_maps.view("<cat>").numpy())
    # TEA moves where <cat> looks (the token's row changes), and the same seed gives the before image as generate
    assert not np.allclose(ex.last["maps"]["before"], ex.last["maps"]["after"])
    # sliders and picker redraw from the kept maps, without generating again
    ex.layer.value, ex.step.value = 1, 2
    np.testing.assert_allclose(ex.last["maps"]["after"], ex.runs["after"][1].view("<cat>", 1, 2).numpy())
    ex.word.value = "background"
    assert ex.last["word"] == "background" and calls == [False, True]
    top = max(float(m.max()) for m in ex.last["maps"].values())
    expected = overlay_rgb(ex.runs["before"][0], ex.runs["before"][1].view("background", 1, 2).numpy(), vmax=top)
    assert ex.before_image.value == ex.last["pngs"]["before"] == png_bytes(expected)
    ex.step.value = ALL
    np.testing.assert_allclose(ex.last["maps"]["before"], ex.runs["before"][1].view("background", 1).numpy())
    assert "all steps" in ex.where.value and "layer 1" in ex.where.value
    share = ex.last["shares"]["before"]["share of word attention"]
    assert share == pytest.approx(float(ex.runs["before"][1].shares["background"][0]))
    # a new prompt or seed: the run stays on screen, marked stale, also through a redraw; generate makes it current
    ex.prompt.value = "a <cat> on a red background"
    assert ex.stale and "the maps below are for seed 1: a &lt;cat&gt; on a gray background" in ex.message.value
    assert "#b00020" not in ex.message.value and calls == [False, True]
    ex.layer.value = 0  # redraws the kept run: still stale
    assert ex.stale and ex.last["prompt"] == PROMPT and ex.last["layer"] == 0 and calls == [False, True]
    ex.prompt.value = PROMPT  # back to the run's prompt: current again
    assert not ex.stale and "seed 1: a &lt;cat&gt; on a gray background" in ex.message.value
    ex.seed.value = 2
    assert ex.stale and "press generate" in ex.message.value
    ex.button.click()
    assert not ex.stale and calls == [False, True] * 2 and ex.runs["seed"] == 2


def test_errors_are_shown(tiny_sd_pipeline_with_cat):
    pipe = tiny_sd_pipeline_with_cat
    ex = AttentionExplorer(make_attention_maps_fn(pipe, "<cat>", "square", steps=2), prompt="a dog")
    assert ex.update() is False and "must contain the learned token '<cat>'" in ex.error
    ex.prompt.value = " "
    assert ex.update() is False and "prompt is empty" in ex.error
    ex.prompt.value, ex.seed.value = PROMPT, -1
    assert ex.update() is False and "seed must be >= 0" in ex.error

    def aggregate_only(prompt, seed, with_tea):
        with attention_maps(pipe, ["<cat>"]) as m:
            image = pipe(prompt, num_inference_steps=2, output_type="np").images[0]
        return image, m
    ex = AttentionExplorer(aggregate_only, prompt=PROMPT)
    assert ex.update() is False and 'keep="all"' in ex.error
    with pytest.raises(ValueError, match="maps_fn must be callable"):
        AttentionExplorer(None)
    with pytest.raises(ValueError, match="unknown|not in|placeholder|token"):
        make_attention_maps_fn(pipe, "<dog>", "square")
