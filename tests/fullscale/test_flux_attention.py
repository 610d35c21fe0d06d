"""Word maps from FLUX.1's joint attention (persviz.attention_joint) on the offline FLUX.1-dev: the image is the same
with and without the collector (max |difference| 0); the recomputed softmax is the attention the processor applied
(its probabilities times the values give the processor's own attention output); the maps and shares are the
aggregate's columns at the words' T5 positions, found here from the tokenizer; the pipeline is restored."""
import numpy as np
import pytest
import torch

from persviz.attention_joint import joint_attention_maps, joint_probabilities
from persviz.hub_models import FLUX_DEV
from persviz.loading import load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a photo of a dog on a beach"
KW = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=64, max_sequence_length=32, output_type="np")


@pytest.fixture(scope="module")
def flux(offline_sd15_cache):
    return load_pipeline(FLUX_DEV, device="cpu")


def test_the_image_is_unchanged_by_the_collector_and_the_pipeline_restored(flux):
    processors = [b.attn.processor for b in flux.transformer.transformer_blocks]
    plain = flux(**KW, generator=torch.Generator().manual_seed(0)).images
    with joint_attention_maps(flux, ["dog", "beach"]) as maps:
        collected = flux(**KW, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(collected - plain).max() == 0.0
    assert [b.attn.processor for b in flux.transformer.transformer_blocks] == processors
    assert "encode_prompt" not in flux.__dict__
    assert maps.calls == 3 * len(flux.transformer.transformer_blocks)  # every double-stream block at every step
    assert maps.grid == (4, 4) and maps.maps["dog"].shape == (1, 4, 4)
    after = flux(**KW, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - plain).max() == 0.0


def test_the_recomputed_softmax_is_the_attention_the_processor_applied(flux):
    attn = flux.transformer.transformer_blocks[0].attn
    seen = {}

    def inputs(module, args, kwargs):
        seen.setdefault("in", kwargs)

    def before_out(module, args):
        seen.setdefault("out", args[0])
    h1 = attn.register_forward_pre_hook(inputs, with_kwargs=True)
    h2 = attn.to_out[0].register_forward_pre_hook(before_out)
    try:
        flux(**{**KW, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(0))
    finally:
        h1.remove()
        h2.remove()
    kw = seen["in"]
    hs, ehs, rotary = kw["hidden_states"], kw["encoder_hidden_states"], kw["image_rotary_emb"]
    with torch.no_grad():
        probs = joint_probabilities(attn, hs, ehs, rotary)  # [B, H, N_img, N_txt + N_img]
        v = torch.cat([attn.add_v_proj(ehs), attn.to_v(hs)], dim=1).unflatten(-1, (-1, attn.head_dim)).float()
        out = torch.einsum("bhij,bjhd->bihd", probs, v).flatten(2, 3)  # the image tokens' attention output
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    torch.testing.assert_close(out, seen["out"].float(), atol=1e-5, rtol=1e-4)


def test_maps_and_shares_are_the_aggregates_columns_at_the_words_t5_tokens(flux):
    with joint_attention_maps(flux, ["dog", "beach", "a"]) as maps:
        flux(**KW, generator=torch.Generator().manual_seed(0))
    tokens = flux.tokenizer_2.tokenize(PROMPT)
    assert tokens == ["▁", "a", "▁photo", "▁of", "▁", "a", "▁dog", "▁on", "▁", "a", "▁be", "ach"]
    assert maps.positions == {"dog": [6], "beach": [10, 11], "a": [0, 1, 4, 5, 8, 9]}
    block = maps.block  # [1, 16, 32]: image tokens x T5 tokens, mean over heads, blocks and steps
    n = len(tokens)
    torch.testing.assert_close(maps.maps["beach"].flatten(1), block[..., 10] + block[..., 11])
    torch.testing.assert_close(maps.shares["dog"], block[..., 6].sum((1,)) / block[..., :n].sum((1, 2)))
    torch.testing.assert_close(maps.special["end"] + maps.special["padding"],
                               block[..., n:].sum((1, 2)) / block.sum((1, 2)))
    assert 0 < float(maps.text_mass[0]) < 1  # the image queries also attend to image keys
    every_word = ["a", "photo", "of", "dog", "on", "beach"]
    with joint_attention_maps(flux, every_word) as all_words:
        flux(**KW, generator=torch.Generator().manual_seed(0))
    total = sum(all_words.shares[w] for w in every_word)
    torch.testing.assert_close(total, torch.ones(1))  # the prompt's word tokens, each counted once
    with pytest.raises(ValueError, match="word 'cat' is not in the prompt's T5 tokens"):
        with joint_attention_maps(flux, ["cat"]):
            flux(**KW, generator=torch.Generator().manual_seed(0))


def test_the_leak_measure_and_the_word_grid_take_flux_maps(flux):
    from matplotlib.figure import Figure

    from persviz.attention_plots import word_grid
    with joint_attention_maps(flux, ["dog", "beach"]) as maps:
        images = flux(**KW, generator=torch.Generator().manual_seed(0)).images
    m = maps.maps["dog"][0]  # [4, 4] on the packed grid; a 64 x 64 mask is area-averaged to it
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    assert float(maps.leak("dog", torch.ones(64, 64))[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(maps.leak("dog", left)[0]) == pytest.approx(float(m[:, 2:].sum() / m.sum()), rel=1e-5)
    fig = word_grid(images, maps, ["dog", "beach"])
    assert isinstance(fig, Figure)
