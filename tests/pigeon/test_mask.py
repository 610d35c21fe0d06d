"""Unit tests of Pigeon's mask generator and Gumbel top-k masking (persviz.pigeon.mask); the losses are in
test_losses.py. CPU, ~1 s."""
from __future__ import annotations

import pytest
import torch

from persviz.pigeon import (HISTORY_TYPE, REFERENCE_TYPE, MaskGenerator, apply_mask, gumbel_topk_mask,
                            mask_history_and_reference)

B, H, N, D = 3, 5, 16, 32


def gen_seeded(seed: int = 0, **kw) -> MaskGenerator:
    torch.manual_seed(seed)
    return MaskGenerator(dim=D, n_tokens=N, n_history=H, **kw)


def tokens(seed: int = 0, b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, H, N, D, generator=g), torch.randn(b, 1, N, D, generator=g)


def keep_k(n: int, ratio: float) -> int:
    return max(1, int(n * (1 - ratio)))


# ---------------------------------------------------------------- gumbel_topk_mask
@pytest.mark.parametrize("n", [16, 10])
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.3, 0.5, 0.7, 0.99, 1.0])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("keep", ["high", "low"])
def test_exact_k_ones_per_image(n: int, ratio: float, training: bool, keep: str) -> None:
    scores = torch.randn(4, 6, n, generator=torch.Generator().manual_seed(1))
    mask = gumbel_topk_mask(scores, ratio, keep=keep, training=training,
                            generator=torch.Generator().manual_seed(2))
    assert mask.shape == scores.shape
    assert torch.all((mask == 0) | (mask == 1)), "forward values must be exactly 0/1"
    assert torch.all(mask.sum(-1) == keep_k(n, ratio))


def test_ratio_edge_cases_keep_all_or_one() -> None:
    scores = torch.randn(2, 3, 16)
    assert torch.all(gumbel_topk_mask(scores, 0.0, training=False) == 1)
    assert torch.all(gumbel_topk_mask(scores, 1.0, training=False).sum(-1) == 1)


def test_keep_high_vs_low_select_extremes() -> None:
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    scores = perm.float().view(1, 1, 8) / 10  # token i has score rank perm[i]
    high = gumbel_topk_mask(scores, 0.5, keep="high", training=False)[0, 0]
    low = gumbel_topk_mask(scores, 0.5, keep="low", training=False)[0, 0]
    assert torch.equal(high.bool(), perm >= 4)  # the 4 highest-scoring tokens
    assert torch.equal(low.bool(), perm < 4)  # the 4 lowest-scoring tokens
    assert torch.all(high + low == 1)  # complementary at ratio 0.5
    top1 = gumbel_topk_mask(scores, 1.0, keep="high", training=False)[0, 0]
    bottom1 = gumbel_topk_mask(scores, 1.0, keep="low", training=False)[0, 0]
    assert top1.argmax().item() == 1 and bottom1.argmax().item() == 2  # perm 7 and perm 0


def test_eval_is_noise_free_topk() -> None:
    scores = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(3))
    a = gumbel_topk_mask(scores, 0.25, training=False, generator=torch.Generator().manual_seed(0))
    b = gumbel_topk_mask(scores, 0.25, training=False, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    expected = torch.zeros_like(scores).scatter_(-1, scores.topk(12, dim=-1).indices, 1.0)
    assert torch.equal(a, expected)
    soft = gumbel_topk_mask(scores, 0.25, training=False, hard=False)
    torch.testing.assert_close(soft, torch.softmax(scores, -1))  # tau = 1, no noise


def test_training_noise_reproducible_with_seed() -> None:
    scores = torch.zeros(8, 6, 16)  # flat scores: the choice is pure noise
    m1 = gumbel_topk_mask(scores, 0.5, generator=torch.Generator().manual_seed(7))
    m2 = gumbel_topk_mask(scores, 0.5, generator=torch.Generator().manual_seed(7))
    m3 = gumbel_topk_mask(scores, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)


def test_per_sample_ratio_tensor() -> None:
    scores = torch.randn(4, 6, 16)
    ratio = torch.tensor([0.0, 0.25, 0.5, 1.0])
    for training in (True, False):
        mask = gumbel_topk_mask(scores, ratio, training=training, generator=torch.Generator().manual_seed(0))
        assert mask.sum(-1).tolist() == [[k] * 6 for k in (16, 12, 8, 1)]
    assert gumbel_topk_mask(scores[:, 0], ratio, training=False).sum(-1).tolist() == [16, 12, 8, 1]  # rank 2


def test_straight_through_gradient_equals_soft_gradient() -> None:
    scores = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(2, 3, 16)
    hard = gumbel_topk_mask(scores, 0.5, generator=torch.Generator().manual_seed(5))
    (g_hard,) = torch.autograd.grad((hard * w).sum(), scores)
    soft = gumbel_topk_mask(scores, 0.5, hard=False, generator=torch.Generator().manual_seed(5))
    (g_soft,) = torch.autograd.grad((soft * w).sum(), scores)
    assert g_hard.abs().sum() > 0 and torch.isfinite(g_hard).all()
    torch.testing.assert_close(g_hard, g_soft)


# ---------------------------------------------------------------- MaskGenerator
def test_generator_scores_shape_range_and_eval_determinism() -> None:
    gen = gen_seeded().eval()
    hist, ref = tokens()
    x = torch.cat([hist, ref], 1)
    ids = [HISTORY_TYPE] * H + [REFERENCE_TYPE]
    s1, s2 = gen(x, ids), gen(x, torch.tensor(ids).expand(B, -1))
    assert s1.shape == (B, H + 1, N)
    assert torch.equal(s1, s2)
    assert s1.abs().max() <= 1 + 1e-6
    # the type embedding matters: calling the reference a history image changes the scores
    torch.manual_seed(0)
    free = MaskGenerator(D, N).eval()  # no n_history check
    assert not torch.allclose(free(x, ids), free(x, [HISTORY_TYPE] * (H + 1)), atol=1e-4)
    gen_sin = gen_seeded(position="sinusoidal").eval()
    assert gen_sin(x, ids).shape == (B, H + 1, N)


def test_gradients_reach_generator_parameters() -> None:
    gen = gen_seeded().train()
    hist, ref = tokens()
    hist_m, ref_m, hist_mask, ref_mask = mask_history_and_reference(
        gen, hist, ref, reference_ratio=None, training=True, generator=torch.Generator().manual_seed(0))
    w = torch.randn_like(hist_m[:, :1])
    ((hist_m * w).sum() + (ref_m * w).sum()).backward()
    missing = [name for name, p in gen.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_mask_history_and_reference_counts_and_directions() -> None:
    gen = gen_seeded().eval()
    hist, ref = tokens()
    ratio = torch.tensor([0.0, 0.5, 1.0])
    hist_m, ref_m, hist_mask, ref_mask = mask_history_and_reference(gen, hist, ref, ratio, training=True,
                                                                    generator=torch.Generator().manual_seed(1))
    assert hist_m.shape == hist.shape and ref_m.shape == ref.shape
    assert torch.all(hist_mask.sum(-1) == keep_k(N, 0.2))  # history ratio 0.2 -> 12 of 16
    assert ref_mask.sum(-1).squeeze(1).tolist() == [16, 8, 1]
    assert torch.all(hist_m[hist_mask == 0] == 0) and torch.equal(hist_m[hist_mask == 1], hist[hist_mask == 1])

    # inference: no noise, reference keeps its HIGH-score tokens (masks the low ones)
    scores = gen(torch.cat([hist, ref], 1), [HISTORY_TYPE] * H + [REFERENCE_TYPE])
    _, _, hist_mask_i, ref_mask_i = mask_history_and_reference(gen, hist, ref, 0.5, training=False)
    top = lambda s, k: torch.zeros_like(s).scatter_(-1, s.topk(k, -1).indices, 1.0)  # noqa: E731
    assert torch.equal(ref_mask_i, top(scores[:, H:], 8))
    assert torch.equal(hist_mask_i, top(scores[:, :H], 12))

    # training: history keep="high" at 0.2, reference keep="low" (masks HIGH-score tokens), same noise stream
    _, _, hist_mask_t, ref_mask_t = mask_history_and_reference(gen, hist, ref, ratio, training=True,
                                                               generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    assert torch.equal(hist_mask_t, gumbel_topk_mask(scores[:, :H], 0.2, keep="high", generator=g))
    assert torch.equal(ref_mask_t, gumbel_topk_mask(scores[:, H:], ratio, keep="low", generator=g))


def test_training_noise_keeps_the_requested_end_more_often() -> None:
    scores = torch.linspace(-3, 3, 8).expand(4000, 8)
    g = torch.Generator().manual_seed(0)
    f_high = gumbel_topk_mask(scores, 0.5, keep="high", generator=g).mean(0)
    f_low = gumbel_topk_mask(scores, 0.5, keep="low", generator=g).mean(0)
    assert f_high[-1] > 0.9 and f_high[0] < 0.1  # highest-score token almost always kept
    assert f_low[-1] < f_low[0] and f_low[-1] < 0.4  # keep="low" (1 - softmax) avoids the top token


def test_training_mask_reproducible_with_generator_seed() -> None:
    gen = gen_seeded().eval()
    hist, ref = tokens()
    run = lambda seed: mask_history_and_reference(gen, hist, ref, None, training=True,  # noqa: E731
                                                  generator=torch.Generator().manual_seed(seed))
    a, b = run(3), run(3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_apply_mask_zeroes_masked_tokens() -> None:
    x = torch.randn(2, 3, 4, 5)
    mask = (torch.rand(2, 3, 4) > 0.5).float()
    out = apply_mask(x, mask)
    assert torch.all(out[mask == 0] == 0) and torch.equal(out[mask == 1], x[mask == 1])


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_bad_ratio_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*MASKED"):
        gumbel_topk_mask(torch.randn(2, 8), ratio)


def test_bad_inputs_raise_useful_errors() -> None:
    s = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"ratio values must lie in \[0, 1\]"):
        gumbel_topk_mask(s, torch.tensor([0.5, 1.2]))
    with pytest.raises(ValueError, match=r"expected \[\] or \[2\]"):
        gumbel_topk_mask(s, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"scores must be a tensor \[B, n_tokens\]"):
        gumbel_topk_mask(torch.randn(8), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        gumbel_topk_mask(torch.tensor([[0.1, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="keep='mid'"):
        gumbel_topk_mask(s, 0.5, keep="mid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tau"):
        gumbel_topk_mask(s, 0.5, tau=0.0)

    gen = gen_seeded()
    hist, ref = tokens()
    with pytest.raises(ValueError, match=r"D=16 but the MaskGenerator was built with dim=32"):
        gen(torch.randn(1, 6, N, 16), [0] * 5 + [1])
    with pytest.raises(ValueError, match=r"\[B, n_images, n_tokens, D\].*unsqueeze"):
        gen(torch.randn(6, N, D), [0] * 5 + [1])
    with pytest.raises(ValueError, match="NaN"):
        gen(torch.full((1, 6, N, D), float("nan")), [0] * 5 + [1])
    with pytest.raises(ValueError, match="rebuild with n_tokens>=20"):
        gen(torch.randn(1, 6, 20, D), [0] * 5 + [1])
    with pytest.raises(ValueError, match="n_history=5"):
        gen(torch.randn(1, 5, N, D), [0] * 4 + [1])
    with pytest.raises(ValueError, match="must agree on B, n_tokens and D"):
        mask_history_and_reference(gen, hist, torch.randn(B, 1, N, 16), 0.5, training=False)
    with pytest.raises(ValueError, match=r"history has 4 images.*n_history=5"):
        mask_history_and_reference(gen, hist[:, :4], ref, 0.5, training=False)
    with pytest.raises(ValueError, match=r"\[B, 1, n, D\]"):
        mask_history_and_reference(gen, hist, torch.cat([ref, ref], 1), 0.5, training=False)
    with pytest.raises(ValueError, match="must be a tensor"):
        mask_history_and_reference(gen, hist[0], ref, 0.5, training=False)
    with pytest.raises(ValueError, match="required at inference"):
        mask_history_and_reference(gen, hist, ref, None, training=False)
    with pytest.raises(ValueError, match="positive multiple of n_heads"):
        MaskGenerator(dim=30, n_tokens=N)
    with pytest.raises(ValueError, match="mask shape"):
        apply_mask(torch.randn(2, 3, 4, 5), torch.ones(2, 3, 5))
