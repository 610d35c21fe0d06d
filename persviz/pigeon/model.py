"""Pigeon's modules at ShapesWorld scale, with the paper's boundaries (Xu et al. 2024, Sec. 2.2).

::

    history images [B, 5, 3, S, S] ─┐                                   ┌─ text states of the instruction
    reference image [B, 3, S, S] ───┤ VisualTokenizer (frozen)          │  (InstructionEncoder, frozen)
                                    ▼                                   ▼
                     tokens [B, 6, n, Dv] ─► MaskGenerator ─► kept tokens ─► PersonalizationModule ("the LMM")
                                                                              │ K tokens [B, K, C]
                                                                              ▼
                 StableDiffusionPipeline(prompt_embeds=..., negative_prompt_embeds=...)  ─► image

Each part is replaceable by a full-scale backbone that keeps its interface:

- ``VisualTokenizer``: float images [N, 3, S, S] in [-1, 1] -> patch tokens [N, n, Dv]; attributes
  ``dim`` (Dv), ``n_tokens`` (n), ``image_size`` (S). ShapesWorld: the CLIP vision tower (patch 8 on
  32x32 -> 16 tokens, width 128). Full scale: CLIP ViT-L/14 (256 tokens, 1024) or LaVIT's tokenizer.
- ``InstructionEncoder``: list of B strings and a length L -> (states [B, L, Dt], attention mask [B, L]).
  ShapesWorld: the CLIP text tower (width 128). Full scale: any transformers text encoder + tokenizer.
- ``MaskGenerator`` (``persviz.pigeon.mask``): scores tokens; masking with ``mask_history_and_reference``.
- ``PersonalizationModule``: reads the kept history tokens, the kept reference tokens (and their
  mean-pooled summary through an MLP adapter, as the paper inserts the reference into the instruction)
  and the instruction's text states; emits K tokens of width C = the UNet's ``cross_attention_dim``.
  Full scale: an LMM (LLaVA, LaVIT) with LoRA whose last K hidden states are projected to C.
- image generator: any diffusers ``StableDiffusionPipeline`` (SD 1.5: C = 768); ``PigeonPipeline``
  passes ``prompt_embeds`` / ``negative_prompt_embeds``, so the real pipeline samples.

Conditioning (``PigeonConfig.condition``):

- ``"text+tokens"`` (default): ``prompt_embeds = [the pipeline's own text encoding of the instruction
  (77 tokens) ; K personalized tokens]``. The frozen UNet then starts from the plain text prompt it was
  trained on and the K tokens add the taste. A deviation from the paper (where only the LMM's tokens
  reach the decoder) that makes training at CPU scale practical.
- ``"tokens"``: ``prompt_embeds`` = the K tokens only, as in the paper.

Negative prompt: the pipeline's encoding of "" (what the UNet saw for classifier-free guidance), with
its last (padding) state repeated for the K extra positions (``"tokens"``: its first K states).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from persviz.io import PathLike, atomic_write, write_json
from persviz.families import assemble_pipeline
from persviz.paths import SHAPESWORLD_DIR
from persviz.pigeon.losses import history_score, select_ratio
from persviz.pigeon.mask import HISTORY_MASK_RATIO, MaskGenerator, mask_history_and_reference
from persviz.pigeon.users import HISTORY_LEN, check_ratio, validate_request

Condition = Literal["text+tokens", "tokens"]

#: Reference mask ratios swept at inference and in stage-2 candidate generation (the paper's 0.0..1.0).
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
WEIGHTS_FILE = "pigeon.safetensors"
CONFIG_FILE = "pigeon_config.json"


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PigeonConfig:
    """Sizes of the trainable parts; ``visual_dim``, ``n_tokens``, ``text_dim``, ``image_size`` and
    ``cross_attention_dim`` must match the frozen backbones (``build_model`` fills them in).

    Args:
        n_history: history images per request (paper: 5).
        n_tokens: visual tokens per image.
        visual_dim: visual token width Dv.
        text_dim: width Dt of the instruction encoder's states.
        cross_attention_dim: the UNet's cross-attention width C.
        image_size: image side S the visual tokenizer takes.
        d_model: width of the personalization transformer.
        n_layers, n_heads: its depth and heads.
        n_out_tokens: K, personalized tokens emitted.
        text_max_length: instruction tokens the module reads (longer instructions are an error).
        condition: "text+tokens" or "tokens" (see the module docstring).
        output_norm: end the module with a fixed LayerNorm copied from the prompt encoder's final
            LayerNorm, so the K tokens have the scale of the text states the UNet was trained on
            (without it they grew to ~4x the text states' norm within 1300 stage-1 steps).
        dropout: dropout in the personalization transformer.
        mask_heads, mask_layers, mask_dropout: the MaskGenerator (paper: 4, 1, 0.2).
        history_ratio: history mask ratio, fraction of tokens MASKED (paper: 0.2).
    """

    n_history: int = HISTORY_LEN
    n_tokens: int = 16
    visual_dim: int = 128
    text_dim: int = 128
    cross_attention_dim: int = 128
    image_size: int = 32
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_out_tokens: int = 8
    text_max_length: int = 16
    condition: str = "text+tokens"
    output_norm: bool = True
    dropout: float = 0.0
    mask_heads: int = 4
    mask_layers: int = 1
    mask_dropout: float = 0.2
    history_ratio: float = HISTORY_MASK_RATIO

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"PigeonConfig.{f.name} must be a positive int; got {v!r}")
        if self.condition not in ("text+tokens", "tokens"):
            raise ValueError(f"condition={self.condition!r}; use 'text+tokens' or 'tokens'")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.mask_dropout < 1.0:
            raise ValueError(f"dropout and mask_dropout must lie in [0, 1); got {self.dropout}, {self.mask_dropout}")
        check_ratio(self.history_ratio, "history_ratio")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PigeonConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PigeonConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- frozen encoders


class _Frozen(nn.Module):
    """A module whose parameters never train and which always stays in eval mode."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "_Frozen":  # noqa: D102 - stays in eval mode
        return super().train(False)


class VisualTokenizer(_Frozen):
    """Patch tokens of a (frozen) ViT vision tower: images [N, 3, S, S] in [-1, 1] -> [N, n, Dv].

    Args:
        vision_model: a module called as ``vision_model(pixel_values=x)`` returning ``last_hidden_state``
            [N, 1 + n, Dv] (a transformers ``CLIPVisionModel``; ``CLIPModel.vision_model``).
        image_size: the input side it takes.
        image_mean, image_std: its normalisation (CLIP processor's values); inputs in [-1, 1] are mapped
            to [0, 1] and then normalised. ShapesWorld's CLIP uses 0.5 / 0.5, i.e. the input unchanged.
        drop_cls: drop the first (class) token.
    """

    def __init__(self, vision_model: nn.Module, image_size: int, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5), drop_cls: bool = True) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.image_size = int(image_size)
        self.drop_cls = drop_cls
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        cfg = getattr(vision_model, "config", None)
        self.dim = int(getattr(cfg, "hidden_size"))
        patch = int(getattr(cfg, "patch_size"))
        self.n_tokens = (self.image_size // patch) ** 2 + (0 if drop_cls else 1)
        self._freeze()

    @classmethod
    def from_clip(cls, clip_model: nn.Module, image_processor: Any = None) -> "VisualTokenizer":
        """From a transformers ``CLIPModel`` (and optionally its image processor for mean / std)."""
        vc = clip_model.config.vision_config
        mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        std = getattr(image_processor, "image_std", None) or (0.5, 0.5, 0.5)
        return cls(clip_model.vision_model, vc.image_size, mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images float [N, 3, S, S] in [-1, 1]. Returns: tokens [N, n, Dv] (float32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, S, S] in [-1, 1]; got {tuple(images.shape)}")
        dtype = next(self.vision_model.parameters()).dtype
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False)
        x = ((x + 1.0) / 2.0 - self.mean) / self.std
        h = self.vision_model(pixel_values=x.to(dtype)).last_hidden_state
        return (h[:, 1:] if self.drop_cls else h).float()


class InstructionEncoder(_Frozen):
    """Text states of a (frozen) text encoder: strings -> (states [B, L, Dt], attention mask [B, L]).

    Args:
        text_model: a transformers text model called as ``text_model(input_ids, attention_mask=...)``
            returning ``last_hidden_state`` (``CLIPTextModel``).
        tokenizer: its tokenizer.
    """

    def __init__(self, text_model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.dim = int(text_model.config.hidden_size)
        self._freeze()

    @property
    def model_max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @torch.no_grad()
    def forward(self, texts: Sequence[str], max_length: int | None = None,
                attention: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts padded to ``max_length`` (default: the tokenizer's, 77 for CLIP).

        Args:
            texts: B strings.
            max_length: padded length L; a text with more tokens raises a ValueError.
            attention: pass the attention mask to the text model (False: as Stable Diffusion's
                pipelines do, the padding is attended, so the states equal ``pipe.encode_prompt``'s).

        Returns:
            (states float32 [B, L, Dt], mask bool [B, L]).
        """
        if isinstance(texts, str):
            texts = [texts]
        L = int(max_length or self.model_max_length)
        full = self.tokenizer(list(texts), padding=False, truncation=False).input_ids
        for t, ids in zip(texts, full):
            if len(ids) > L:
                raise ValueError(f"instruction {t!r} has {len(ids)} tokens but at most {L} are read; shorten it "
                                 f"or raise PigeonConfig.text_max_length")
        enc = self.tokenizer(list(texts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        device = next(self.text_model.parameters()).device
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        out = self.text_model(ids, attention_mask=mask if attention else None)
        return out.last_hidden_state.float(), mask.bool()


# ----------------------------------------------------------------------------- the LMM


@contextlib.contextmanager
def _without_mha_fastpath() -> Iterator[None]:
    """Turn off PyTorch's fused inference path of nn.TransformerEncoder for the duration: eval / no-grad
    forwards then compute exactly what training forwards compute (so a frozen copy used as the DPO
    reference equals the policy bit for bit at the start of stage 2)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


class PersonalizationModule(nn.Module):
    """A small transformer standing in for the LMM: kept visual tokens + instruction -> K tokens [B, K, C].

    Sequence read (one bidirectional encoder, pre-norm): the H x n kept history tokens, the n kept
    reference tokens (masked tokens are zero embeddings, as in the paper), one reference summary (the
    mean of the kept reference tokens through an MLP adapter), the instruction's text states (padding
    is not attended) and K learned query tokens; the K query outputs, layer-normed and projected to C,
    are the personalized tokens (optionally through a fixed output LayerNorm, ``set_output_norm``,
    that puts them at the scale of the text states). Visual tokens carry an image index (history 0..H-1, reference H)
    and a patch position, text states a position, each segment a type embedding.

    Args:
        visual_dim, text_dim, out_dim: Dv, Dt and C.
        n_history, n_tokens, text_max_length: H, n and the largest text length L.
        n_out_tokens: K.
        d_model, n_layers, n_heads, dropout: the transformer.
    """

    def __init__(self, visual_dim: int, text_dim: int, out_dim: int, n_history: int = HISTORY_LEN,
                 n_tokens: int = 16, text_max_length: int = 16, n_out_tokens: int = 8, d_model: int = 128,
                 n_layers: int = 2, n_heads: int = 4, dropout: float = 0.0, output_norm: bool = True) -> None:
        super().__init__()
        self.n_history, self.n_tokens, self.n_out_tokens = n_history, n_tokens, n_out_tokens
        self.visual_dim, self.text_dim, self.out_dim = visual_dim, text_dim, out_dim
        self.text_max_length = text_max_length
        self.visual_in = nn.Linear(visual_dim, d_model)
        self.text_in = nn.Linear(text_dim, d_model)
        self.adapter = nn.Sequential(nn.Linear(visual_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.image_embedding = nn.Embedding(n_history + 1, d_model)
        self.patch_embedding = nn.Embedding(n_tokens, d_model)
        self.text_position = nn.Embedding(text_max_length, d_model)
        self.segment = nn.Embedding(4, d_model)  # 0 visual, 1 reference summary, 2 text, 3 query
        self.queries = nn.Parameter(torch.randn(n_out_tokens, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, out_dim)
        self.output_norm = output_norm
        self.register_buffer("out_norm_weight", torch.ones(out_dim))
        self.register_buffer("out_norm_bias", torch.zeros(out_dim))

    def set_output_norm(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """The fixed output LayerNorm's affine parameters (e.g. the text encoder's ``final_layer_norm``)."""
        self.out_norm_weight.copy_(weight.detach())
        self.out_norm_bias.copy_(bias.detach())

    def forward(self, history_tokens: torch.Tensor, reference_tokens: torch.Tensor, reference_mask: torch.Tensor,
                text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Args:
            history_tokens: kept history tokens [B, H, n, Dv] (masked ones zero).
            reference_tokens: kept reference tokens [B, 1, n, Dv].
            reference_mask: the reference keep-mask [B, 1, n] (1 = kept; may carry straight-through gradients).
            text_states: [B, L, Dt].
            text_mask: bool [B, L], True = a real token.

        Returns:
            Personalized tokens [B, K, C].
        """
        b, h, n, dv = history_tokens.shape
        if (h, n, dv) != (self.n_history, self.n_tokens, self.visual_dim):
            raise ValueError(f"history_tokens {tuple(history_tokens.shape)} must be [B, {self.n_history}, "
                             f"{self.n_tokens}, {self.visual_dim}]")
        if tuple(reference_tokens.shape) != (b, 1, n, dv) or tuple(reference_mask.shape) != (b, 1, n):
            raise ValueError(f"reference_tokens {tuple(reference_tokens.shape)} / reference_mask "
                             f"{tuple(reference_mask.shape)} must be [{b}, 1, {n}, {dv}] / [{b}, 1, {n}]")
        L = text_states.shape[1]
        if text_states.shape[0] != b or text_states.shape[2] != self.text_dim or L > self.text_max_length:
            raise ValueError(f"text_states {tuple(text_states.shape)} must be [{b}, L <= {self.text_max_length}, "
                             f"{self.text_dim}]")
        device = history_tokens.device
        visual = torch.cat([history_tokens, reference_tokens], 1)                   # [B, H+1, n, Dv]
        v = self.visual_in(visual) + self.image_embedding.weight[:, None] + self.patch_embedding.weight[None]
        v = v.reshape(b, (h + 1) * n, -1) + self.segment.weight[0]
        m = reference_mask.to(reference_tokens.dtype).unsqueeze(-1)
        pooled = (reference_tokens * m).sum(2) / m.sum(2).clamp_min(1.0)           # [B, 1, Dv]
        summary = self.adapter(pooled) + self.segment.weight[1]
        t = self.text_in(text_states) + self.text_position.weight[:L] + self.segment.weight[2]
        q = (self.queries + self.segment.weight[3]).unsqueeze(0).expand(b, -1, -1)
        x = torch.cat([v, summary, t, q], 1)
        pad = torch.zeros(b, x.shape[1], dtype=torch.bool, device=device)
        pad[:, v.shape[1] + 1:v.shape[1] + 1 + L] = ~text_mask.to(device)
        with _without_mha_fastpath():
            y = self.encoder(x, src_key_padding_mask=pad)
        out = self.out(self.norm(y[:, -self.n_out_tokens:]))
        if self.output_norm:
            out = F.layer_norm(out, (self.out_dim,), self.out_norm_weight, self.out_norm_bias)
        return out


# ----------------------------------------------------------------------------- the whole model


def final_layer_norm(text_model: nn.Module) -> nn.LayerNorm | None:
    """The final LayerNorm of a transformers CLIP text model (``CLIPTextModel`` or its ``text_model``)."""
    inner = getattr(text_model, "text_model", text_model)
    ln = getattr(inner, "final_layer_norm", None)
    return ln if isinstance(ln, nn.LayerNorm) else None


@dataclass
class PigeonInputs:
    """What the personalization module reads (``PigeonModel.prepare``); masks are 1 = kept."""

    history_tokens: torch.Tensor      # [B, H, n, Dv], masked tokens zero
    reference_tokens: torch.Tensor    # [B, 1, n, Dv]
    history_mask: torch.Tensor        # [B, H, n]
    reference_mask: torch.Tensor      # [B, 1, n]
    text_states: torch.Tensor         # [B, L, Dt]
    text_mask: torch.Tensor           # bool [B, L]
    prompt_states: torch.Tensor | None  # [B, 77, C]: the pipeline's encoding of the instruction ("text+tokens")


#: How ``PigeonModel.prepare`` treats the history (``PigeonModel.history_mode``): "mask" (Pigeon: keep the
#: high-score tokens at ``config.history_ratio``), "keep" (every history token read as it is, no history mask and
#: so no gradient through one: the unmasked-history row and the trained baseline), "none" (every history token
#: zeroed before scoring and masked: the model reads only the reference and instruction) or "truth" (the history
#: keep-mask is given with the request, ``history_keep=``: the perfect mask of the ground truth, e.g.
#: ``measures.truth_keep_mask``; no gradient reaches the mask generator through it).
HISTORY_MODES = ("mask", "keep", "none", "truth")


class PigeonModel(nn.Module):
    """Frozen encoders + the trainable MaskGenerator and PersonalizationModule.

    ``history_mode`` (default "mask", see ``HISTORY_MODES``) switches the history off or its masking off for
    ablations; ``persviz.pigeon.study.history_mode`` sets it for a block.

    Args:
        config: PigeonConfig (dims must match the encoders; see ``build_model``).
        visual: the VisualTokenizer.
        text: the InstructionEncoder the LMM reads.
        prompt_encoder: the diffusion pipeline's own text encoder (``InstructionEncoder(pipe.text_encoder,
            pipe.tokenizer)``): needed for condition "text+tokens" and for the negative prompt.
    """

    def __init__(self, config: PigeonConfig, visual: VisualTokenizer, text: InstructionEncoder,
                 prompt_encoder: InstructionEncoder | None = None) -> None:
        super().__init__()
        if (visual.dim, visual.n_tokens, visual.image_size) != (config.visual_dim, config.n_tokens, config.image_size):
            raise ValueError(f"the visual tokenizer gives {visual.n_tokens} tokens of width {visual.dim} for "
                             f"{visual.image_size}px images but the config says {config.n_tokens} x "
                             f"{config.visual_dim} at {config.image_size}px; build the config with build_model")
        if text.dim != config.text_dim:
            raise ValueError(f"the instruction encoder has width {text.dim}, the config text_dim={config.text_dim}")
        if prompt_encoder is not None and prompt_encoder.dim != config.cross_attention_dim:
            raise ValueError(f"the prompt encoder has width {prompt_encoder.dim} but the UNet's cross_attention_dim "
                             f"is {config.cross_attention_dim}")
        self.config = config
        self.visual = visual
        self.text = text
        self.prompt_encoder = prompt_encoder
        self.history_mode = "mask"
        self.mask_generator = MaskGenerator(dim=config.visual_dim, n_tokens=config.n_tokens, n_heads=config.mask_heads,
                                            n_layers=config.mask_layers, n_history=config.n_history,
                                            dropout=config.mask_dropout)
        self.personalization = PersonalizationModule(
            config.visual_dim, config.text_dim, config.cross_attention_dim, config.n_history, config.n_tokens,
            config.text_max_length, config.n_out_tokens, config.d_model, config.n_layers, config.n_heads,
            config.dropout, config.output_norm)
        ln = final_layer_norm(prompt_encoder.text_model) if prompt_encoder is not None else None
        if config.output_norm and ln is not None:
            with torch.no_grad():
                self.personalization.set_output_norm(ln.weight, ln.bias)

    # -- parameters ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.personalization.queries.device

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The parts that train: {"mask_generator": ..., "personalization": ...}."""
        return {"mask_generator": self.mask_generator, "personalization": self.personalization}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """float32 CPU copies of the trainable weights, keys prefixed by module name."""
        return {f"{name}.{k}": v.detach().float().cpu().clone() for name, m in self.trainable_modules().items()
                for k, v in m.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load weights saved by ``trainable_state_dict`` (all keys must match)."""
        for name, m in self.trainable_modules().items():
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            m.load_state_dict(sub, strict=True)
        extra = [k for k in state if k.split(".")[0] not in self.trainable_modules()]
        if extra:
            raise ValueError(f"unexpected weights {extra[:3]}; this file is not a Pigeon weights file")

    # -- forward ------------------------------------------------------------------------------------
    def prepare(self, history: Any, reference: Any, instruction: str | Sequence[str],
                reference_ratio: float | torch.Tensor | None, training: bool,
                generator: torch.Generator | None = None, history_keep: Any = None) -> PigeonInputs:
        """Validate a request (``users.validate_request``), tokenize, mask and encode the text.

        Args:
            history, reference, instruction: see ``validate_request``.
            reference_ratio: reference mask ratio (float, B floats or a tensor [B]); None draws U[0, 1]
                per sample (training only).
            training: Pigeon's training masking (Gumbel noise, high-score reference tokens masked)
                or inference masking (no noise, low-score reference tokens masked).
            generator: torch.Generator (on the model's device) for the Gumbel noise and drawn ratios.
            history_keep: history_mode "truth" only (and required there): the history keep-mask [B, H, n] (or
                [H, n] for one request), 1 / True = read the token, 0 / False = zero it.
        """
        cfg = self.config
        hist, ref, texts = validate_request(history, reference, instruction, reference_ratio,
                                            cfg.n_history, cfg.image_size)
        device = self.device
        b = hist.shape[0]
        tokens = self.visual(torch.cat([hist.flatten(0, 1), ref]).to(device))
        hist_tok = tokens[:b * cfg.n_history].view(b, cfg.n_history, *tokens.shape[1:])
        ref_tok = tokens[b * cfg.n_history:].unsqueeze(1)
        if isinstance(reference_ratio, (list, tuple)):
            reference_ratio = torch.tensor([float(r) for r in reference_ratio])
        if isinstance(reference_ratio, torch.Tensor):
            reference_ratio = reference_ratio.to(device)
        mode = self.history_mode
        if mode not in HISTORY_MODES:
            raise ValueError(f"history_mode={mode!r}; use one of {HISTORY_MODES}")
        if (history_keep is not None) != (mode == "truth"):
            given = "given" if history_keep is not None else "None"
            raise ValueError("history_keep (the ground-truth keep-mask) goes with history_mode 'truth' only; got "
                             f"history_mode={mode!r} and history_keep {given}")
        if mode == "none":
            hist_tok = torch.zeros_like(hist_tok)
        hist_m, ref_m, hist_mask, ref_mask = mask_history_and_reference(
            self.mask_generator, hist_tok, ref_tok, reference_ratio, training=training, generator=generator,
            history_ratio=0.0 if mode in ("keep", "truth") else cfg.history_ratio)
        if mode == "none":
            hist_mask = torch.zeros_like(hist_mask)
        elif mode == "keep":  # every history token as it is: no gradient reaches the generator through the history
            hist_m, hist_mask = hist_tok, torch.ones_like(hist_mask)
        elif mode == "truth":  # the given mask: masked tokens are zero embeddings, as Pigeon's own mask makes them
            keep = torch.as_tensor(history_keep, device=device)
            keep = keep.unsqueeze(0) if keep.ndim == 2 else keep
            if tuple(keep.shape) != tuple(hist_mask.shape):
                raise ValueError(f"history_keep has shape {tuple(keep.shape)}; expected {tuple(hist_mask.shape)} "
                                 f"(requests, history images, tokens)")
            hist_mask = keep.to(hist_tok.dtype)
            hist_m = hist_tok * hist_mask.unsqueeze(-1)
        text_states, text_mask = self.text(texts, cfg.text_max_length)
        prompt_states = None
        if cfg.condition == "text+tokens":
            if self.prompt_encoder is None:
                raise ValueError("condition 'text+tokens' needs the pipeline's text encoder: build the model with "
                                 "prompt_encoder=InstructionEncoder(pipe.text_encoder, pipe.tokenizer)")
            prompt_states, _ = self.prompt_encoder(texts, attention=False)
        return PigeonInputs(hist_m, ref_m, hist_mask, ref_mask, text_states, text_mask, prompt_states)

    def condition(self, inputs: PigeonInputs, personalization: nn.Module | None = None) -> torch.Tensor:
        """``prompt_embeds`` [B, (77 +) K, C] from prepared inputs (``personalization`` overrides the module,
        e.g. the frozen stage-1 copy used as the DPO reference)."""
        module = personalization if personalization is not None else self.personalization
        tokens = module(inputs.history_tokens, inputs.reference_tokens, inputs.reference_mask,
                        inputs.text_states, inputs.text_mask)
        if inputs.prompt_states is None:
            return tokens
        return torch.cat([inputs.prompt_states.to(tokens.dtype), tokens], 1)

    def forward(self, history: Any, reference: Any, instruction: str | Sequence[str],
                reference_ratio: float | torch.Tensor | None = None, training: bool = True,
                generator: torch.Generator | None = None, history_keep: Any = None) -> torch.Tensor:
        """``prompt_embeds`` for a request: ``condition(prepare(...))``."""
        return self.condition(self.prepare(history, reference, instruction, reference_ratio, training, generator,
                                           history_keep))

    @torch.no_grad()
    def negative_prompt_embeds(self, batch: int) -> torch.Tensor:
        """The unconditional embeddings matching ``condition``'s shape: [B, (77 +) K, C]."""
        if self.prompt_encoder is None:
            raise ValueError("the negative prompt needs the pipeline's text encoder (prompt_encoder)")
        empty, _ = self.prompt_encoder([""], attention=False)       # [1, 77, C]
        k = self.config.n_out_tokens
        if self.config.condition == "text+tokens":
            neg = torch.cat([empty, empty[:, -1:].expand(1, k, -1)], 1)
        else:
            extra = max(0, k - empty.shape[1])
            neg = torch.cat([empty, empty[:, -1:].expand(1, extra, -1)], 1)[:, :k]
        return neg.expand(batch, -1, -1).to(self.device)


def build_model(clip_model: nn.Module, tokenizer: Any, cross_attention_dim: int,
                prompt_encoder: InstructionEncoder | None = None, config: PigeonConfig | None = None,
                image_processor: Any = None, seed: int | None = 0, **overrides: Any) -> PigeonModel:
    """A PigeonModel on a transformers ``CLIPModel`` (vision tower -> VisualTokenizer, text tower ->
    InstructionEncoder); the backbone dims are filled into the config.

    Args:
        clip_model: the CLIP (frozen; shared, not copied).
        tokenizer: its tokenizer.
        cross_attention_dim: the UNet's cross-attention width.
        prompt_encoder: the pipeline's text encoder (see PigeonModel).
        config: base config (other fields kept); ``overrides`` replace fields.
        image_processor: the CLIP image processor (for mean / std).
        seed: seed of the trainable modules' initial weights (drawn inside ``torch.random.fork_rng``,
            the global random state is left alone); None: from the global random state.
    """
    visual = VisualTokenizer.from_clip(clip_model, image_processor)
    text = InstructionEncoder(clip_model.text_model, tokenizer)
    base = (config or PigeonConfig()).to_dict()
    base.update(overrides)
    base.update(visual_dim=visual.dim, n_tokens=visual.n_tokens, image_size=visual.image_size, text_dim=text.dim,
                cross_attention_dim=int(cross_attention_dim))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return PigeonModel(PigeonConfig.from_dict(base), visual, text, prompt_encoder)


# ----------------------------------------------------------------------------- CLIP scores


class ClipScorer:
    """CLIP-I / CLIP-T on images in [-1, 1] (the reward of stage 2 and the test-time ratio choice).

    Args:
        clip_model: a transformers ``CLIPModel``.
        tokenizer: its tokenizer.
        image_mean, image_std: its image normalisation.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Any, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        self.model, self.tokenizer = clip_model, tokenizer
        self.image_size = int(clip_model.config.vision_config.image_size)
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings [N, P] (float32) of float images [N, 3, S, S] in [-1, 1]."""
        x = images.float()
        if tuple(x.shape[-2:]) != (self.image_size,) * 2:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False)
        x = (((x + 1.0) / 2.0).cpu() - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        pooled = self.model.vision_model(pixel_values=x.to(self.device, dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings [N, P] (float32)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(enc.input_ids, attention_mask=enc.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def clip_t(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """100 x cos(image, its text), [N]."""
        return 100.0 * (self.embed_images(images) * self.embed_texts(texts)).sum(-1)

    def history_scores(self, images: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Pigeon's reward per request: ``history_score`` of each image against its own history.

        Args:
            images: [B, 3, S, S] (one candidate per request) or [B, R, 3, S, S] (R candidates each).
            history: [B, H, 3, S, S].

        Returns:
            [B] or [B, R].
        """
        single = images.ndim == 4
        imgs = images.unsqueeze(1) if single else images
        b, r = imgs.shape[:2]
        e_img = self.embed_images(imgs.flatten(0, 1)).view(b, r, -1)
        e_hist = self.embed_images(history.flatten(0, 1)).view(b, history.shape[1], -1)
        out = torch.stack([history_score(e_img[i], e_hist[i]) for i in range(b)]).float()
        return out[:, 0] if single else out


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class Selection:
    """The result of ``PigeonPipeline.select``: per request the candidate at the best ratio."""

    images: torch.Tensor          # [B, 3, S, S] in [0, 1]: the selected candidates
    ratio_index: list[int]        # per request, index into ratios
    ratios: tuple[float, ...]
    candidates: torch.Tensor      # [B, R, 3, S, S] in [0, 1]
    clip_t: torch.Tensor          # [B, R]
    history_score: torch.Tensor   # [B, R]


def save_weights(model: PigeonModel, folder: PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``pigeon.safetensors`` (trainable weights) and ``pigeon_config.json`` atomically; returns the folder."""
    out = Path(folder).expanduser()
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(model.trainable_state_dict(), p))
    record = {"config": model.config.to_dict(), **(dict(extra) if extra else {})}
    write_json(out / CONFIG_FILE, record)
    return out


def read_config(folder: PathLike) -> PigeonConfig:
    """The PigeonConfig saved in a weights folder."""
    path = Path(folder).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path.parent}; train with `persviz pigeon train` "
                                f"or pass the folder that holds {WEIGHTS_FILE}")
    return PigeonConfig.from_dict(json.loads(path.read_text())["config"])


def load_weights(model: PigeonModel, folder: PathLike) -> PigeonModel:
    """Load ``pigeon.safetensors`` of a folder into the model (its config must match)."""
    folder = Path(folder).expanduser()
    saved = read_config(folder)
    if saved != model.config:
        diff = {k: (v, getattr(model.config, k)) for k, v in saved.to_dict().items() if getattr(model.config, k) != v}
        raise ValueError(f"{folder} was trained with another PigeonConfig (saved vs model: {diff}); build the model "
                         f"with read_config(folder)")
    model.load_trainable_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model


class PigeonPipeline:
    """Personalized generation: a PigeonModel conditions a diffusers ``StableDiffusionPipeline``.

    Args:
        model: the PigeonModel (its ``cross_attention_dim`` must be the UNet's).
        sd: the StableDiffusionPipeline; it samples from ``prompt_embeds`` / ``negative_prompt_embeds``.
        scorer: a ClipScorer for ``select`` and stage 2 (optional otherwise).
    """

    def __init__(self, model: PigeonModel, sd: Any, scorer: ClipScorer | None = None) -> None:
        cross = int(sd.unet.config.cross_attention_dim)
        if cross != model.config.cross_attention_dim:
            raise ValueError(f"the UNet's cross_attention_dim is {cross} but the Pigeon model emits "
                             f"{model.config.cross_attention_dim}-wide tokens; build it with "
                             f"cross_attention_dim={cross}")
        for part in (sd.unet, sd.vae, sd.text_encoder):
            part.requires_grad_(False)
            part.eval()
        self.model, self.sd, self.scorer = model, sd, scorer

    @property
    def unet(self) -> nn.Module:
        return self.sd.unet

    @property
    def vae(self) -> nn.Module:
        return self.sd.vae

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @classmethod
    def from_shapesworld(cls, weights: PathLike | None = None, config: PigeonConfig | None = None,
                         device: str | None = None, sd: Any = None, seed: int = 0,
                         **overrides: Any) -> "PigeonPipeline":
        """The ShapesWorld Pigeon: CLIP at data/shapesworld/clip, micro-SD at data/shapesworld/sd.

        Args:
            weights: a folder with pigeon.safetensors (its config is used); None: untrained weights.
            config: base config when ``weights`` is None; ``overrides`` replace its fields.
            device: torch device (default CPU).
            sd: an already loaded StableDiffusionPipeline to use instead of the shipped one.
            seed: seed of the initial trainable weights (replaced when ``weights`` is given).
        """
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer  # heavy: transformers

        clip_dir = SHAPESWORLD_DIR / "clip"
        dev = torch.device(device or "cpu")
        sd = sd if sd is not None else assemble_pipeline(device=str(dev), dtype=torch.float32)
        clip = CLIPModel.from_pretrained(clip_dir).to(dev).eval().requires_grad_(False)
        tok = CLIPTokenizer.from_pretrained(clip_dir)
        proc = CLIPImageProcessor.from_pretrained(clip_dir)
        if weights is not None:
            config = read_config(weights)
        prompt = InstructionEncoder(sd.text_encoder, sd.tokenizer)
        model = build_model(clip, tok, sd.unet.config.cross_attention_dim, prompt, config, proc, seed, **overrides)
        if weights is not None:
            load_weights(model, weights)
        scorer = ClipScorer(clip, tok, proc.image_mean, proc.image_std)
        return cls(model.to(dev), sd, scorer)

    def save_pretrained(self, folder: PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Save the trainable weights and config (the frozen backbones are not copied)."""
        return save_weights(self.model, folder, extra)

    # -- generation ---------------------------------------------------------------------------------
    def _latents(self, batch: int, generator: torch.Generator | int | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        f = int(getattr(self.sd, "vae_scale_factor", 8))
        shape = (batch, int(self.unet.config.in_channels), self.image_size // f, self.image_size // f)
        return torch.randn(shape, generator=g)

    @torch.no_grad()
    def __call__(self, history: Any, reference: Any, instruction: str | Sequence[str],
                 reference_ratio: float = 0.5, num_inference_steps: int = 25, guidance_scale: float = 4.0,
                 generator: torch.Generator | int | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pt", history_keep: Any = None) -> Any:
        """Generate one image per request at one reference mask ratio (inference masking).

        Args:
            history, reference, instruction: see ``users.validate_request``.
            reference_ratio: fraction of the reference's (low-score) tokens masked, in [0, 1].
            num_inference_steps, guidance_scale: the sampler's (ShapesWorld defaults 25 / 4.0).
            generator: CPU torch.Generator or int seed for the initial latents.
            latents: initial latents [B, 4, h, w] (overrides generator).
            output_type: "pt" (float [B, 3, S, S] in [0, 1]), "np", "pil" or "latent".
            history_keep: the history keep-mask of history_mode "truth" (``PigeonModel.prepare``).

        Returns:
            The diffusers pipeline output (``.images``).
        """
        check_ratio(reference_ratio)
        was_training = self.model.training
        self.model.eval()
        try:
            inputs = self.model.prepare(history, reference, instruction, reference_ratio, training=False,
                                        history_keep=history_keep)
            pe = self.model.condition(inputs)
        finally:
            self.model.train(was_training)
        b = pe.shape[0]
        if latents is None:
            latents = self._latents(b, generator)
        dtype = self.unet.dtype
        neg = self.model.negative_prompt_embeds(b).to(dtype)
        return self.sd(prompt_embeds=pe.to(dtype), negative_prompt_embeds=neg,
                       latents=latents.to(self.sd._execution_device, dtype), num_inference_steps=num_inference_steps,
                       guidance_scale=guidance_scale, height=self.image_size, width=self.image_size,
                       output_type=output_type)

    @torch.no_grad()
    def candidates(self, history: Any, reference: Any, instruction: str | Sequence[str],
                   ratios: Sequence[float] = RATIOS, generator: torch.Generator | int | None = 0,
                   output_type: str = "pt", **kw: Any) -> torch.Tensor:
        """One candidate per reference ratio, all from the same initial latents.

        Returns:
            [B, R, 3, S, S] in [0, 1] (``output_type="pt"``) or latents [B, R, c, h, w] (``"latent"``).
        """
        if output_type not in ("pt", "latent"):
            raise ValueError("candidates returns tensors: output_type 'pt' or 'latent'")
        for r in ratios:
            check_ratio(r)
        hist, _, _ = validate_request(history, reference, instruction, None, self.model.config.n_history,
                                      self.image_size)
        latents = self._latents(hist.shape[0], generator)
        outs = [self(history, reference, instruction, r, latents=latents.clone(), output_type=output_type, **kw).images
                for r in ratios]
        return torch.stack([o.float().cpu() for o in outs], 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pipeline latents (scaled) [N, c, h, w] -> images [N, 3, S, S] in [0, 1]."""
        with torch.no_grad():
            x = self.vae.decode(latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1.0) / 2.0).clamp(0, 1).cpu()

    @torch.no_grad()
    def select(self, history: Any, reference: Any, instruction: str | Sequence[str],
               target_text: str | Sequence[str] | None = None, ratios: Sequence[float] = RATIOS,
               clip_weight: float = 0.5, generator: torch.Generator | int | None = 0, **kw: Any) -> Selection:
        """Pigeon's test-time choice: generate at every ratio, keep the one maximising
        ``clip_weight * CLIP-T(image, target_text) + (1 - clip_weight) * history score``.

        Args:
            target_text: the target semantics for CLIP-T (default: the instruction).
            Other arguments: see ``candidates``.
        """
        if self.scorer is None:
            raise ValueError("select needs a ClipScorer; build the pipeline with scorer=ClipScorer(clip, tokenizer)")
        hist, _, texts = validate_request(history, reference, instruction, None, self.model.config.n_history,
                                          self.image_size)
        if target_text is None:
            targets = texts
        else:
            targets = [target_text] if isinstance(target_text, str) else list(target_text)
        if len(targets) != len(texts):
            raise ValueError(f"{len(targets)} target texts for {len(texts)} requests")
        cands = self.candidates(history, reference, instruction, ratios, generator, **kw)  # [B, R, 3, S, S]
        b, r = cands.shape[:2]
        x = cands * 2.0 - 1.0
        clip_t = self.scorer.clip_t(x.flatten(0, 1), [t for t in targets for _ in range(r)]).view(b, r)
        hs = self.scorer.history_scores(x, hist)
        idx = [select_ratio(clip_t[i], hs[i], clip_weight) for i in range(b)]
        chosen = torch.stack([cands[i, j] for i, j in enumerate(idx)])
        return Selection(chosen, idx, tuple(float(v) for v in ratios), cands, clip_t, hs)


# ----------------------------------------------------------------------------- tiny random parts (tests)


def tiny_pipeline(config: PigeonConfig | None = None, seed: int = 0, width: int = 32,
                  **overrides: Any) -> PigeonPipeline:
    """A PigeonPipeline with random tiny components (diffusers' ``get_dummy_components`` style): a 1-layer
    CLIP of width ``width`` (vision patch 8 on 32x32), a 2-block UNet and VAE (32x32 <-> 16x16x4 latents),
    DPM-Solver++; the ShapesWorld tokenizer. For tests and ``persviz pigeon train --tiny``."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel  # heavy: diffusers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer  # heavy: transformers

    tok = CLIPTokenizer.from_pretrained(SHAPESWORLD_DIR / "tokenizer")
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=width, intermediate_size=2 * width,
                           num_hidden_layers=1, num_attention_heads=4),
        projection_dim=width)).eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=width,
                                norm_num_groups=2, attention_head_dim=2)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=2)
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1)
    sd = StableDiffusionPipeline(vae=vae, text_encoder=clip.text_model, tokenizer=tok, unet=unet, scheduler=sched,
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    model = build_model(clip, tok, width, InstructionEncoder(clip.text_model, tok), config, seed=seed + 3, **overrides)
    return PigeonPipeline(model, sd, ClipScorer(clip, tok))
