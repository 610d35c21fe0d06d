"""TEA on a real (tiny, random) StableDiffusionPipeline: the context manager and prompt-level TEA (the embedding
files and statistics of persviz.embeddings: tests/floor/test_embeddings.py)."""
import numpy as np
import pytest
import torch

from persviz.embeddings import class_word_id, token_row
from persviz.tea.adjust import DEFAULTS, slerp_adjust
from persviz.tea.pipeline import encode_prompt_level, tea

from tests.helpers import D, random_vector as _vec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PERSONAL = "a sks square on a gray background"
CLASS = "a square on a gray background"


def _gen(pipe, prompt="a <cat> on a gray background", **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=16, width=16, generator=g,
                output_type="np", **kw).images


def _W(pipe):
    return pipe.text_encoder.get_input_embeddings().weight


# ----------------------------------------------------------------------------- tea context manager


def test_tea_writes_exactly_the_slerp_row_and_restores_bit_exactly(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    W0 = _W(ti_pipe).detach().clone()
    ph, sq = token_row(ti_pipe, "<cat>"), class_word_id(ti_pipe.tokenizer, "square")
    with tea(ti_pipe, "<cat>", "square", rotation=0.3, scale=0.6) as adj:
        W = _W(ti_pipe).detach()
        expected = slerp_adjust(W0[ph], W0[sq], 0.3, 0.6)
        assert torch.equal(W[ph], expected) and not torch.equal(W[ph], W0[ph])
        others = torch.ones(len(W), dtype=torch.bool)
        others[ph] = False
        assert torch.equal(W[others], W0[others])
        assert adj.placeholder_ids == (ph,) and adj.class_id == sq
        assert torch.equal(adj.original[0], W0[ph]) and torch.equal(adj.adjusted[0], expected)
    assert torch.equal(_W(ti_pipe).detach(), W0)


def test_tea_restores_after_an_exception(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    W0 = _W(ti_pipe).detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with tea(ti_pipe, "<cat>", "square"):
            assert not torch.equal(_W(ti_pipe).detach(), W0)
            raise RuntimeError("boom")
    assert torch.equal(_W(ti_pipe).detach(), W0)


def test_tea_defaults_come_from_the_method(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    with tea(ti_pipe, "<cat>", "square") as adj:
        assert (adj.rotation, adj.scale) == (DEFAULTS["textual_inversion"]["rotation"], DEFAULTS["textual_inversion"]["scale"])
    with tea(ti_pipe, "<cat>", "square", method="dreambooth", scale=0.0) as adj:
        assert (adj.rotation, adj.scale) == (DEFAULTS["dreambooth"]["rotation"], 0.0)


def test_multi_vector_placeholder_is_adjusted_row_by_row(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    pipe.load_textual_inversion({"<cat>": _vec(2, n=3)})
    W0 = _W(pipe).detach().clone()
    ids = [token_row(pipe, t) for t in ("<cat>", "<cat>_1", "<cat>_2")]
    c = W0[class_word_id(pipe.tokenizer, "circle")]
    with tea(pipe, "<cat>", "circle", rotation=0.5, scale=0.5) as adj:
        assert adj.placeholder_ids == tuple(ids)
        for i in ids:
            assert torch.equal(_W(pipe).detach()[i], slerp_adjust(W0[i], c, 0.5, 0.5))
    assert torch.equal(_W(pipe).detach(), W0)


def test_generation_inside_differs_and_equals_the_row_set_by_hand(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    outside = _gen(ti_pipe)
    with tea(ti_pipe, "<cat>", "square", rotation=0.5, scale=0.5) as adj:
        inside = _gen(ti_pipe)
    assert np.abs(inside - outside).max() > 1e-6
    np.testing.assert_array_equal(_gen(ti_pipe), outside)
    ph = token_row(ti_pipe, "<cat>")
    with torch.no_grad():
        _W(ti_pipe)[ph] = adj.adjusted[0]
    np.testing.assert_array_equal(_gen(ti_pipe), inside)


def test_rotation_zero_scale_zero_leaves_generation_unchanged(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    outside = _gen(ti_pipe)
    with tea(ti_pipe, "<cat>", "square", rotation=0.0, scale=0.0):
        np.testing.assert_array_equal(_gen(ti_pipe), outside)


def test_tea_bad_inputs_give_clear_errors_and_leave_the_model_alone(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    W0 = _W(ti_pipe).detach().clone()
    with pytest.raises(ValueError, match=r"'<dog>' is not in the tokenizer \(it tokenizes to .*\); load the embedding first with pipe.load_textual_inversion"):
        with tea(ti_pipe, "<dog>", "square"):
            pass
    with pytest.raises(ValueError, match=r"unknown class word 'dog' .*pick a word that tokenizes to one token, e.g. '"):
        with tea(ti_pipe, "<cat>", "dog"):
            pass
    with pytest.raises(ValueError, match=r"rotation must be a number in \[0, 1\]"):
        with tea(ti_pipe, "<cat>", "square", rotation=1.5):
            pass
    with pytest.raises(ValueError, match=r"scale must be a number in \[0, 1\]"):
        with tea(ti_pipe, "<cat>", "square", scale=-0.1):
            pass
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        with tea(ti_pipe, "<cat>", "square", method="lora"):
            pass
    with pytest.raises(ValueError, match="is the placeholder itself"):
        with tea(ti_pipe, "<cat>", "<cat>"):
            pass
    assert torch.equal(_W(ti_pipe).detach(), W0)


# ----------------------------------------------------------------------------- prompt level (Eq. 2)


def test_prompt_level_identity_equals_the_plain_encoding(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    pe, ne = encode_prompt_level(pipe, PERSONAL, CLASS, rotation=0.0, scale=0.0)
    ref_pe, ref_ne = pipe.encode_prompt(PERSONAL, torch.device("cpu"), 1, True, negative_prompt="")
    torch.testing.assert_close(pe, ref_pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(ne, ref_ne, rtol=0, atol=0)
    assert pe.shape == (1, 77, D)
    np.testing.assert_allclose(_gen(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, prompt=None),
                               _gen(pipe, prompt=PERSONAL), rtol=0, atol=1e-6)


def test_aligned_pairs_sks_with_the_class_word_unaligned_pairs_k_with_k(tiny_sd_pipeline):
    pipe = tiny_sd_pipeline
    ids_p = pipe.tokenizer(PERSONAL).input_ids
    ids_c = pipe.tokenizer(CLASS).input_ids
    bos, eos, a, sks, square, on, gray, bg = 668, 669, 353, 655, 657, 636, 613, 561
    assert ids_p == [bos, a, sks, square, on, a, gray, bg, eos]
    assert ids_c == [bos, a, square, on, a, gray, bg, eos]
    h_c, _ = pipe.encode_prompt(CLASS, torch.device("cpu"), 1, False)
    # rotation 1, scale 1 replaces each position by the class position it is paired with
    aligned, _ = encode_prompt_level(pipe, PERSONAL, CLASS, rotation=1.0, scale=1.0)
    by_hand = [0, 1, 2, 2] + list(range(3, 76))  # sks (2) and square (3) -> square (2); then i -> i - 1
    torch.testing.assert_close(aligned[0], h_c[0, by_hand], rtol=0, atol=1e-5)
    unaligned, _ = encode_prompt_level(pipe, PERSONAL, CLASS, rotation=1.0, scale=1.0, aligned=False)
    torch.testing.assert_close(unaligned[0], h_c[0], rtol=0, atol=1e-5)
    assert (aligned[0, 4] - unaligned[0, 4]).abs().max() > 1e-3  # 'on' meets 'on' vs 'a'
    # a batch, with one class prompt for all rows and class_word given
    pe, ne = encode_prompt_level(pipe, [PERSONAL, "a sks square"], ["a square on a gray background", "a square"],
                                 0.1, 0.5, class_word="square")
    assert pe.shape == ne.shape == (2, 77, D)


def test_placeholder_that_replaces_the_class_word_pairs_position_by_position(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    h_c, _ = ti_pipe.encode_prompt(CLASS, torch.device("cpu"), 1, False)
    out, _ = encode_prompt_level(ti_pipe, "a <cat> on a gray background", CLASS, 1.0, 1.0, placeholder="<cat>")
    torch.testing.assert_close(out[0], h_c[0], rtol=0, atol=1e-5)


def test_prompt_level_bad_inputs_give_clear_errors(tiny_sd_pipeline_with_cat):
    ti_pipe = tiny_sd_pipeline_with_cat
    with pytest.raises(ValueError, match=r"prompt 'a square on a gray background' does not contain the placeholder 'sks'"):
        encode_prompt_level(ti_pipe, CLASS, CLASS, 0.1, 0.5)
    with pytest.raises(ValueError, match="class prompt .* contains the placeholder"):
        encode_prompt_level(ti_pipe, PERSONAL, PERSONAL, 0.1, 0.5)
    with pytest.raises(ValueError, match="cannot pair .* do(es)? not match the class prompt"):
        encode_prompt_level(ti_pipe, PERSONAL, "a square on a white background", 0.1, 0.5)
    with pytest.raises(ValueError, match="unknown class word 'dog'"):
        encode_prompt_level(ti_pipe, PERSONAL, CLASS, 0.1, 0.5, class_word="dog")
    with pytest.raises(ValueError, match="'<dog>' is not in the tokenizer"):
        encode_prompt_level(ti_pipe, PERSONAL, CLASS, 0.1, 0.5, placeholder="<dog>")
    with pytest.raises(ValueError, match=r"rotation must be a number in \[0, 1\]"):
        encode_prompt_level(ti_pipe, PERSONAL, CLASS, 2.0, 0.5)
    with pytest.raises(ValueError, match="2 personalized prompts but 3 class prompts"):
        encode_prompt_level(ti_pipe, [PERSONAL] * 2, [CLASS] * 3, 0.1, 0.5)
