"""TEA on Flux (docs/tea.md §2) on the offline FLUX.1-dev (random weights, clip_l 32 wide, T5 48, the T5 tokenizer
trained offline, which splits "sks" into "▁sk" "s" and "teapot" into five pieces): prompt level on the T5 prompt
embedding and the pooled CLIP embedding, as the TEA authors' Flux integrations adjust them, checked against
FluxPipeline.encode_prompt's own tensors and Eq. 1 written out per position; at rotation 0, scale 0 the image is the
pipeline's own; token level on learned rows of both encoders, each toward its encoder's class-word rows."""
import numpy as np
import pytest
import torch

from persviz.embeddings import load_learned_token
from persviz.families import text_stack
from persviz.hub_models import FLUX_DEV
from persviz.loading import load_pipeline
from persviz.tea.pipeline import embeds_kwargs, encode_prompt_level, tea
from tests.helpers import hand_slerp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T5_LENGTH = 32  # the test T5 tokenizer's model_max_length: what encode_prompt_level pads to, as max_sequence_length
GEN = dict(num_inference_steps=2, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def flux(offline_sd15_cache):
    return load_pipeline(FLUX_DEV, device="cpu")


@torch.no_grad()
def pipeline_embeds(pipe, prompt):
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=T5_LENGTH)
    return prompt_embeds, pooled


def test_prompt_level_tea_at_rotation_0_scale_0_gives_the_pipelines_embeddings_and_image(flux):
    personal, cls = "a photo of sks teapot", "a photo of teapot"
    result = encode_prompt_level(flux, personal, cls, 0.0, 0.0, placeholder="sks")
    assert len(result) == 4  # (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled): encode_prompt's order
    prompt_embeds, pooled = pipeline_embeds(flux, personal)
    assert result[0].shape == (1, T5_LENGTH, 48) and result[2].shape == (1, 32)  # T5's state, CLIP's pooled output
    assert torch.equal(result[0], prompt_embeds) and torch.equal(result[2], pooled)
    mine = flux(**embeds_kwargs(result), generator=torch.Generator().manual_seed(0), **GEN).images
    theirs = flux(prompt=personal, max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(0),
                  **GEN).images
    assert np.abs(mine - theirs).max() == 0.0
    moved = encode_prompt_level(flux, personal, cls, 0.2, 0.5, placeholder="sks")
    other = flux(**embeds_kwargs(moved), generator=torch.Generator().manual_seed(0), **GEN).images
    assert np.abs(other - theirs).max() > 1e-4  # the adjustment reaches the image: the comparison can fail


def test_prompt_level_tea_on_flux_is_eq1_per_aligned_position_and_on_the_pooled_embedding(flux):
    personal, cls = "a photo of sks teapot", "a photo of teapot"
    tok = flux.tokenizer_2
    assert tok.tokenize(personal) == ["▁", "a", "▁photo", "▁of", "▁sk", "s", "▁", "t", "e", "a", "pot"]
    assert tok.tokenize(cls) == ["▁", "a", "▁photo", "▁of", "▁", "t", "e", "a", "pot"]
    # personal positions 0-3 pair with 0-3; "▁sk" and "s" (the placeholder) with the class word's first two tokens
    # (4, 5); the class word's own five tokens (6-10) with 4-8; "</s>" (11) with 8 + 1; padding 12-31 with 10-29
    pairs = [(i, i) for i in range(4)] + [(4, 4), (5, 5)] + [(6 + t, 4 + t) for t in range(5)] + \
        [(i, i - 2) for i in range(11, T5_LENGTH)]
    h_p, pooled_p = pipeline_embeds(flux, personal)
    h_c, pooled_c = pipeline_embeds(flux, cls)
    expected = torch.stack([hand_slerp(h_p[0, i], h_c[0, j], 0.2, 0.5) for i, j in pairs])
    prompt_embeds, _, pooled, _ = encode_prompt_level(flux, personal, cls, 0.2, 0.5, placeholder="sks")
    torch.testing.assert_close(prompt_embeds[0].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[0].double(), hand_slerp(pooled_p[0], pooled_c[0], 0.2, 0.5), atol=1e-5,
                               rtol=1e-5)
    by_word = encode_prompt_level(flux, personal, cls, 0.2, 0.5, placeholder="sks", class_word="teapot")
    assert torch.equal(by_word[0], prompt_embeds)  # the class word read from the class prompt is "teapot"
    unpooled = encode_prompt_level(flux, personal, cls, 0.2, 0.5, placeholder="sks", adjust_pooled=False)
    assert torch.equal(unpooled[2], pooled_p) and torch.equal(unpooled[0], prompt_embeds)


def test_token_level_tea_on_flux_moves_each_encoders_row_toward_its_class_word_rows(offline_sd15_cache):
    flux = load_pipeline(FLUX_DEV, device="cpu")  # its own: the token is loaded into it
    stack = text_stack(flux)
    g = torch.Generator().manual_seed(3)
    rows = {e.name: 4.0 * torch.randn(e.width, generator=g) for e in stack}
    for e in stack:
        load_learned_token(flux, {"<v*>": rows[e.name]}, text=e)
    assert flux.tokenizer_2.tokenize("a photo of <v*>") == ["▁", "a", "▁photo", "▁of", "<v*>"]
    clip, t5 = stack
    c_l = clip.word_row("teapot")  # one CLIP token; five T5 tokens: c is the mean of their rows
    teapot = flux.tokenizer_2("teapot", add_special_tokens=False).input_ids
    assert len(teapot) == 5
    c_t = t5.rows[teapot].detach().mean(dim=0)
    prompt = "a photo of <v*>"
    before = flux(prompt=prompt, max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(0),
                  **GEN).images
    with tea(flux, "<v*>", "teapot", 0.2, 0.5) as adj:
        assert [a.encoder for a in adj.per_encoder] == ["clip_l", "t5"]
        id_l = flux.tokenizer.convert_tokens_to_ids("<v*>")
        id_t = flux.tokenizer_2.convert_tokens_to_ids("<v*>")
        torch.testing.assert_close(clip.rows[id_l].double(), hand_slerp(rows["clip_l"], c_l, 0.2, 0.5),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t5.rows[id_t].double(), hand_slerp(rows["t5"], c_t, 0.2, 0.5), atol=1e-5,
                                   rtol=1e-5)
    assert torch.equal(clip.rows[id_l], rows["clip_l"]) and torch.equal(t5.rows[id_t], rows["t5"])  # restored
    with tea(flux, "<v*>", "teapot", 0.0, 0.0):
        same = flux(prompt=prompt, max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(0),
                    **GEN).images
    assert np.abs(same - before).max() == 0.0
