"""Pigeon stage-2 pieces: the Diffusion-DPO loss and the preference reward / ratio selection.

``diffusion_dpo_loss`` follows the sigmoid loss of the diffusers example
``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (huggingface/diffusers),
Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908). ``history_score`` and
``select_ratio`` are Pigeon's reward and test-time ratio choice (Xu et al. 2024, Sec. 2.2.4).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = torch.Tensor | np.ndarray


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32 or wider: [B]."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    err = F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none")
    return err.mean(dim=list(range(1, err.ndim)))


def diffusion_dpo_loss(model_pred_w: torch.Tensor, model_pred_l: torch.Tensor,
                       ref_pred_w: torch.Tensor, ref_pred_l: torch.Tensor,
                       target_w: torch.Tensor, target_l: torch.Tensor,
                       beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO sigmoid loss, exactly as in the diffusers ``train_diffusion_dpo.py`` example.

    ``mse_* = mean((pred - target)^2)`` per sample (w = chosen, l = rejected);
    ``model_diff = mse_w - mse_l``, ``ref_diff = ref_mse_w - ref_mse_l``;
    ``logits = ref_diff - model_diff``; ``loss = mean(-logsigmoid(beta * logits))``;
    ``implicit_acc = mean(logits > 0) + 0.5 * mean(logits == 0)``.

    Scale convention: diffusers' ``beta`` multiplies the MSE difference directly (its default
    ``beta_dpo`` is 2500). The original Diffusion-DPO training code writes
    ``-0.5 * beta_dpo * (model_diff - ref_diff)`` with ``beta_dpo = 5000``; pass half of that
    beta here to reproduce it. Reference predictions are detached.

    On the size of beta. The default 0.1 is Pigeon's value, but Pigeon applies DPO to the LMM's
    token log-likelihoods (sums over many tokens, differences of order 1 and more). Here the
    logits are differences of per-sample diffusion MSEs, of order 1e-4..1e-2, so ``beta * logits``
    is 1e-5..1e-3: the sigmoid sits at its midpoint, the loss reads log 2 to 5-7 digits whatever the
    model does, and the objective degenerates to ``log 2 + (beta / 2) * (model_diff - ref_diff)``:
    a constant-weight "lower the chosen error, raise the rejected error" with none of DPO's
    saturation, i.e. no implicit anchoring to the reference model (and with Adam, whose step size
    ignores the gradient's scale, it still moves the weights at the full learning rate). Watch
    ``implicit_acc`` and ``model_diff - ref_diff`` rather than the loss. The diffusers
    ``train_diffusion_dpo.py`` example uses ``beta_dpo = 2500`` (the Diffusion-DPO paper's SD 1.5
    runs: 5000 in the ``0.5 * beta`` convention), which puts ``beta * logits`` at order 1 - use that
    scale for a DPO that behaves as DPO; beta stays a parameter so either can be run.

    Args:
        model_pred_w, model_pred_l: trained model's predictions for chosen / rejected, [B, ...].
        ref_pred_w, ref_pred_l: frozen reference model's predictions, [B, ...].
        target_w, target_l: regression targets (noise, velocity, ...), [B, ...].
        beta: DPO strength (the diffusers convention above).

    Returns:
        (loss, stats): scalar loss and detached scalars "implicit_acc", "raw_model_loss",
        "raw_ref_loss", "model_diff", "ref_diff" (batch means).
    """
    named = {"model_pred_w": model_pred_w, "model_pred_l": model_pred_l, "ref_pred_w": ref_pred_w,
             "ref_pred_l": ref_pred_l, "target_w": target_w, "target_l": target_l}
    shape = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor [B, ...]")
        if t.ndim < 2:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B, ...] with at least one "
                             f"dimension after the batch (use t.unsqueeze(-1) for scalar predictions)")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but model_pred_w has {tuple(shape)}; "
                             f"all predictions and targets must share one shape")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; check the model outputs / targets")
    if isinstance(beta, bool) or not float(beta) > 0:
        raise ValueError(f"beta={beta} must be a positive float (diffusers default 2500, Pigeon 0.1)")

    model_losses_w = _per_sample_mse(model_pred_w, target_w)
    model_losses_l = _per_sample_mse(model_pred_l, target_l)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses_w = _per_sample_mse(ref_pred_w.detach(), target_w)
        ref_losses_l = _per_sample_mse(ref_pred_l.detach(), target_l)
        ref_diff = ref_losses_w - ref_losses_l

    logits = ref_diff - model_diff
    loss = -F.logsigmoid(beta * logits).mean()
    implicit_acc = (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean()
    stats = {
        "implicit_acc": implicit_acc.detach(),
        "raw_model_loss": (0.5 * (model_losses_w.mean() + model_losses_l.mean())).detach(),
        "raw_ref_loss": (0.5 * (ref_losses_w.mean() + ref_losses_l.mean())).detach(),
        "model_diff": model_diff.mean().detach(),
        "ref_diff": ref_diff.mean().detach(),
    }
    return loss, stats


def _as_matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """Validate an embedding matrix [N, D]."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array [N, D]; got {type(x).__name__}")
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be [N, D] with N >= 1; got shape {tuple(t.shape)} "
                         f"(use x.unsqueeze(0) for one embedding)")
    if not t.is_floating_point():
        t = t.double()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; check the image encoder output")
    return t


def history_score(image_emb: ArrayLike, history_emb: ArrayLike) -> torch.Tensor:
    """Pigeon's preference reward: mean cosine similarity of each image to the history, x 100.

    Args:
        image_emb: image embeddings [N, D] (e.g. CLIP image features of the candidates).
        history_emb: history image embeddings [H, D], same encoder.

    Returns:
        Scores [N] (a zero-norm embedding has cosine 0).
    """
    img = _as_matrix(image_emb, "image_emb")
    hist = _as_matrix(history_emb, "history_emb")
    if img.shape[1] != hist.shape[1]:
        raise ValueError(f"image_emb has D={img.shape[1]} but history_emb has D={hist.shape[1]}; "
                         f"embed both with the same encoder")
    dtype = torch.promote_types(img.dtype, hist.dtype)
    img = F.normalize(img.to(dtype), dim=-1)
    hist = F.normalize(hist.to(device=img.device, dtype=dtype), dim=-1)
    return 100.0 * (img @ hist.T).mean(dim=1)


def select_ratio(clip_t: ArrayLike, history_score: ArrayLike, clip_weight: float = 0.5) -> int:
    """Index of the mask ratio maximising ``clip_weight * clip_t + (1 - clip_weight) * history_score``.

    Pigeon's test-time choice (weights 0.5 / 0.5); both scores should be on the same x100 scale.
    Ties go to the first index.

    Args:
        clip_t: CLIP-T of each candidate (one per ratio) to the target semantics, [R].
        history_score: ``history_score`` of each candidate, [R].
        clip_weight: weight of CLIP-T in [0, 1].

    Returns:
        The best index in ``range(R)``.
    """
    a = torch.as_tensor(clip_t, dtype=torch.float64).detach().cpu()
    b = torch.as_tensor(history_score, dtype=torch.float64).detach().cpu()
    if a.ndim != 1 or a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"clip_t {tuple(a.shape)} and history_score {tuple(b.shape)} must both be "
                         f"non-empty 1-D [R], one value per mask ratio")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("clip_t or history_score contains NaN or inf")
    if not 0.0 <= clip_weight <= 1.0:
        raise ValueError(f"clip_weight={clip_weight} must be in [0, 1]")
    return int(torch.argmax(clip_weight * a + (1.0 - clip_weight) * b).item())
