"""Unit tests of Pigeon's stage-2 losses and selection (persviz.pigeon.losses): the Diffusion-DPO loss worked by hand,
the history score against numpy, the ratio selection on hand-made scores. CPU, < 1 s."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from persviz.pigeon import diffusion_dpo_loss, history_score, select_ratio


def const(values: list[float], shape: tuple[int, ...] = (4, 2, 2)) -> torch.Tensor:
    """Per-sample constant tensors [B, *shape]: MSE to zero = value ** 2."""
    return torch.tensor(values).view(-1, *[1] * len(shape)).expand(-1, *shape).clone()


def test_dpo_loss_hand_computed() -> None:
    zeros = torch.zeros(2, 4, 2, 2)
    # MSEs: model w = [1, 4], model l = [4, 1], ref w = ref l = [2, 1]
    mw = const([1.0, 2.0]).requires_grad_()
    ml = const([2.0, 1.0]).requires_grad_()
    rw, rl = const([math.sqrt(2), 1.0]), const([math.sqrt(2), 1.0])
    loss, stats = diffusion_dpo_loss(mw, ml, rw, rl, zeros, zeros, beta=0.1)
    # logits = ref_diff - model_diff = [0 - (1 - 4), 0 - (4 - 1)] = [3, -3]
    expected = 0.5 * (math.log1p(math.exp(-0.3)) + math.log1p(math.exp(0.3)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["implicit_acc"].item() == pytest.approx(0.5)
    assert stats["raw_model_loss"].item() == pytest.approx(2.5)
    assert stats["raw_ref_loss"].item() == pytest.approx(1.5)
    assert stats["model_diff"].item() == pytest.approx(0.0)
    assert stats["ref_diff"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert mw.grad is not None and ml.grad is not None
    # the original Diffusion-DPO code's -0.5 * beta_dpo * (model_diff - ref_diff) with beta_dpo = 2 * beta
    logits = torch.tensor([3.0, -3.0])
    assert loss.item() == pytest.approx((-F.logsigmoid(-0.5 * 0.2 * -logits)).mean().item(), rel=1e-6)


def test_dpo_loss_is_log2_when_model_equals_reference() -> None:
    g = torch.Generator().manual_seed(0)
    pw, pl, tw, tl = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(4))
    loss, stats = diffusion_dpo_loss(pw, pl, pw.clone(), pl.clone(), tw, tl, beta=2500.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert stats["implicit_acc"].item() == pytest.approx(0.5)


def test_dpo_loss_bad_inputs() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must share one shape"):
        diffusion_dpo_loss(x, x, x, x, x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one dimension after the batch"):
        diffusion_dpo_loss(*[torch.zeros(2)] * 6)
    with pytest.raises(ValueError, match="NaN"):
        diffusion_dpo_loss(torch.full((2, 3), float("nan")), x, x, x, x, x)
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(x, x, x, x, x, x, beta=0.0)


def test_history_score_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    img, hist = rng.normal(size=(4, 16)), rng.normal(size=(5, 16))
    ref = 100 * np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in hist] for a in img]).mean(1)
    out64 = history_score(torch.from_numpy(img), torch.from_numpy(hist))
    np.testing.assert_allclose(out64.numpy(), ref, rtol=1e-10)
    out32 = history_score(torch.from_numpy(img).float(), torch.from_numpy(hist).float())
    assert out32.shape == (4,)
    np.testing.assert_allclose(out32.numpy(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="same encoder"):
        history_score(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        history_score(torch.randn(8), torch.randn(3, 8))


def test_select_ratio_hand_made() -> None:
    clip_t = torch.tensor([30.0, 28.0, 25.0, 20.0])
    hist = torch.tensor([50.0, 60.0, 62.0, 61.0])
    # 0.5 * (clip + hist) = [40, 44, 43.5, 40.5]: neither score's own argmax (0 and 2) wins
    assert select_ratio(clip_t, hist) == 1
    assert select_ratio([1.0, 1.0], [2.0, 2.0]) == 0  # ties -> first index
    assert select_ratio(clip_t, hist, clip_weight=1.0) == 0
    with pytest.raises(ValueError, match="one value per mask ratio"):
        select_ratio(clip_t, hist[:3])
