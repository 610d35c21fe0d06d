"""Prompt-level TEA (Eq. 2) on SDXL (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48): each encoder's part
of the concatenated hidden state and clip_g's pooled embedding, positions aligned between the prompt with the token
and the prompt with the class word; checked against diffusers' own StableDiffusionXLPipeline.encode_prompt and its
images, and against Eq. 1 written out by hand."""
import math

import numpy as np
import pytest
import torch

from tests.helpers import hand_slerp
from persviz.families import assemble_pipeline, text_stack
from persviz.generation import generate_from_embeds
from persviz.hub_models import SDXL_BASE
from persviz.tea import embeds_kwargs, encode_prompt_level
from persviz.tea.adjust import prompt_level_adjust

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PERSONAL = "a photo of sks dog on the grass"
CLASS = "a photo of dog on the grass"
WIDTHS = (32, 48)  # clip_l, clip_g of the reduced-width test SDXL


@pytest.fixture(scope="module")
def sdxl(offline_sd15_cache):
    return assemble_pipeline(SDXL_BASE, device="cpu")


def hand_pair(i):
    """The aligned pairing of PERSONAL with CLASS worked out by hand: <bos> a photo of | sks dog | on the grass
    <eos> pad...; 'sks' and 'dog' both pair with the class prompt's 'dog' (position 4), every later position with
    the class prompt's position one before it."""
    return i if i < 4 else 4 if i in (4, 5) else i - 1


def reference(pipe, prompt, negative_prompt=None):
    """diffusers' own encoding: (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)."""
    return pipe.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                              do_classifier_free_guidance=True, negative_prompt=negative_prompt)


def images(pipe, **kwargs):
    return pipe(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def test_prompt_level_adjust_on_a_hand_worked_tiny_tensor():
    # position 0: v = (2, 0), c = (0, 1), rotation 0.5, scale 0.5: m = 1.5, theta = pi/2, so 1.5 (sin(pi/4), sin(pi/4));
    # position 1: parallel to its class position: m = 0.5 * 3 + 0.5 * 1 = 2 along (0, 1); position 2 is unpaired
    h_p = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]]])
    h_c = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    out = prompt_level_adjust(h_p, h_c, 0.5, 0.5, [(0, 0), (1, 1)])
    s = 1.5 / math.sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[[s, s], [0.0, 2.0], [5.0, 5.0]]]))


def test_rotation_0_scale_0_gives_encode_prompts_parts_and_the_untouched_images(sdxl):
    pe, ne, pooled, npooled = encode_prompt_level(sdxl, PERSONAL, CLASS, 0.0, 0.0, class_word="dog")
    ref_pe, ref_ne, ref_pooled, ref_npooled = reference(sdxl, PERSONAL)
    assert pe.shape == (1, 77, sum(WIDTHS)) and pooled.shape == (1, WIDTHS[1])
    for part in (slice(0, WIDTHS[0]), slice(WIDTHS[0], None)):  # clip_l's part, then clip_g's
        torch.testing.assert_close(pe[..., part], ref_pe[..., part], rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    # no negative prompt: zeros, as the pipeline (force_zeros_for_empty_prompt)
    assert not ne.any() and not npooled.any() and ne.shape == ref_ne.shape and torch.equal(npooled, ref_npooled)
    np.testing.assert_array_equal(images(sdxl, **embeds_kwargs((pe, ne, pooled, npooled))), images(sdxl, prompt=PERSONAL))
    got = generate_from_embeds(sdxl, **embeds_kwargs((pe, ne, pooled, npooled)), steps=2, guidance=5.0)
    plain = images(sdxl, prompt=PERSONAL, guidance_scale=5.0)
    np.testing.assert_array_equal(got, np.clip(np.round(plain * 255), 0, 255).astype(np.uint8))
    # a negative prompt is encoded plainly, as encode_prompt encodes it
    _, ne, _, npooled = encode_prompt_level(sdxl, PERSONAL, CLASS, 0.0, 0.0, negative_prompt="blurry")
    _, ref_ne, _, ref_npooled = reference(sdxl, PERSONAL, negative_prompt="blurry")
    torch.testing.assert_close(ne, ref_ne, rtol=0, atol=0)
    torch.testing.assert_close(npooled, ref_npooled, rtol=0, atol=0)


def test_each_encoder_part_and_the_pooled_embedding_move_toward_the_class_prompts(sdxl):
    r, s = 0.3, 0.5
    pe, _, pooled, _ = encode_prompt_level(sdxl, PERSONAL, CLASS, r, s, class_word="dog")
    ref_p, ref_c = reference(sdxl, PERSONAL), reference(sdxl, CLASS)
    start = 0
    for width in WIDTHS:  # each part toward the class prompt's same part, with that part's own norms
        part = slice(start, start + width)
        for i in range(77):
            want = hand_slerp(ref_p[0][0, i, part], ref_c[0][0, hand_pair(i), part], r, s)
            torch.testing.assert_close(pe[0, i, part].double(), want, atol=1e-5, rtol=1e-5)
        start += width
    torch.testing.assert_close(pooled[0].double(), hand_slerp(ref_p[2][0], ref_c[2][0], r, s), atol=1e-5, rtol=1e-5)
    # adjust_pooled=False keeps the pooled embedding as encode_prompt makes it
    _, _, kept, _ = encode_prompt_level(sdxl, PERSONAL, CLASS, r, s, adjust_pooled=False)
    torch.testing.assert_close(kept, ref_p[2], rtol=0, atol=0)
    # the adjusted embeddings change the image
    assert not np.array_equal(images(sdxl, **embeds_kwargs(encode_prompt_level(sdxl, PERSONAL, CLASS, r, s))),
                              images(sdxl, prompt=PERSONAL))


def test_a_batch_an_anchor_per_encoder_and_the_refusals(sdxl):
    pe, ne, pooled, npooled = encode_prompt_level(sdxl, [PERSONAL, "sks dog"], [CLASS, "dog"], 0.2, 0.5)
    assert pe.shape == (2, 77, 80) and pooled.shape == (2, 48) and ne.shape == pe.shape and npooled.shape == pooled.shape
    one, _, one_pooled, _ = encode_prompt_level(sdxl, "sks dog", "dog", 0.2, 0.5)
    torch.testing.assert_close(pe[1:], one, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[1:], one_pooled, rtol=0, atol=1e-6)
    anchors = [e.encoder for e in text_stack(sdxl)]
    with_anchor = encode_prompt_level(sdxl, PERSONAL, CLASS, 0.2, 0.5, anchor_encoder=anchors)
    for a, b in zip(with_anchor, encode_prompt_level(sdxl, PERSONAL, CLASS, 0.2, 0.5)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one text encoder per encoder of the pipeline, in order \\(clip_l, clip_g\\)"):
        encode_prompt_level(sdxl, PERSONAL, CLASS, 0.2, 0.5, anchor_encoder=sdxl.text_encoder)
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        encode_prompt_level(sdxl, CLASS, CLASS, 0.2, 0.5)
    with pytest.raises(ValueError, match="expected the 2 or 4 tensors"):
        embeds_kwargs((pe,))
