"""TEA on a diffusers StableDiffusionPipeline: token level (Eq. 1) as a context manager, prompt level (Eq. 2).

    with tea(pipe, "<cat-toy>", "toy"):           # Textual Inversion: rows of the placeholder adjusted
        images = pipe("a <cat-toy> on a beach").images
    pe, ne = encode_prompt_level(pipe, "a sks dog on a beach", "a dog on a beach", 0.1, 0.5)
    images = pipe(prompt_embeds=pe, negative_prompt_embeds=ne).images   # DreamBooth

The math lives in persviz.tea.adjust; this module only finds rows and positions and writes/reads them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from persviz.families import text_stack
from persviz.families.base import Pipeline
from persviz.embeddings import prompt_parts, single_token_id, tokens_of, class_word_id, token_row
from persviz.tea.adjust import DEFAULTS, check_knob, align_positions, prompt_level_adjust, slerp_adjust
from persviz.text_stack import PlaceholderRows, TextEncoder, TextStack


@dataclass(frozen=True)
class TeaAdjustment:
    """What `tea` wrote: the placeholder's rows, the class row, the knobs and the rows before/after."""

    placeholder_ids: tuple[int, ...]
    class_id: int
    rotation: float
    scale: float
    original: torch.Tensor  # [n, D], the rows before the adjustment (restored on exit)
    adjusted: torch.Tensor  # [n, D], slerp_adjust(original, class row, rotation, scale)
    encoder: str = ""  # the text encoder's name (clip_l, clip_g)
    per_encoder: tuple["TeaAdjustment", ...] = ()  # several encoders (SDXL): each one's; the fields above: the first's


def model_stack(obj: Any) -> TextStack:
    """The text stack of a pipeline (persviz.families.text_stack), a text stack as it is, or a (tokenizer,
    text_encoder) pair as a stack of one encoder."""
    if isinstance(obj, TextStack):
        return obj
    if isinstance(obj, (tuple, list)) or not hasattr(obj, "unet"):
        tokenizer, encoder = prompt_parts(obj, required=True)
        return TextStack((TextEncoder("text_encoder", tokenizer, encoder),))
    return text_stack(obj)


def check_knobs(method: str, rotation: float | None, scale: float | None) -> tuple[float, float]:
    """rotation and scale, defaulting to tea.DEFAULTS[method]; ValueError outside [0, 1] or for an unknown method."""
    if method not in DEFAULTS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(DEFAULTS)}")
    d = DEFAULTS[method]
    return (
        check_knob(d["rotation"] if rotation is None else rotation, "rotation"),
        check_knob(d["scale"] if scale is None else scale, "scale"),
    )


def _placeholder_ids(tokenizer: Any, encoder: Any, placeholder: str) -> list[int]:
    """Ids of the placeholder and of its extra vectors placeholder_1, placeholder_2, ... (diffusers' multi-vector names)."""
    if not isinstance(placeholder, str) or not placeholder.strip():
        raise ValueError(f"placeholder must be a non-empty string; got {placeholder!r}")
    if single_token_id(tokenizer, placeholder) is None:
        raise ValueError(
            f"placeholder {placeholder!r} is not in the tokenizer (it tokenizes to {tokens_of(tokenizer, placeholder)}); "
            f"load the embedding first with pipe.load_textual_inversion(path) or "
            f"pipe.load_textual_inversion(persviz.embeddings.load_learned_embeds(path))"
        )
    ids = [token_row((tokenizer, encoder), placeholder)]
    added = getattr(tokenizer, "added_tokens_encoder", {})
    i = 1
    while f"{placeholder}_{i}" in added:
        ids.append(token_row((tokenizer, encoder), f"{placeholder}_{i}"))
        i += 1
    return ids


def _class_id(tokenizer: Any, class_word: str, placeholder_ids: Sequence[int]) -> int:
    """The class word's id, refused if it is one of the placeholder's own rows."""
    cid = class_word_id(tokenizer, class_word)
    if cid in placeholder_ids:
        raise ValueError(f"class word {class_word!r} is the placeholder itself; pass the class word (e.g. 'dog')")
    return cid


@contextmanager
def tea(
    pipe: Pipeline,
    placeholder: str,
    class_word: str,
    rotation: float | None = None,
    scale: float | None = None,
    method: str = "textual_inversion",
) -> Iterator[TeaAdjustment]:
    """Inside the block, the placeholder's embedding row(s) hold slerp_adjust(V*, c) (Eq. 1); exact rows restored on exit.

    Args:
        pipe: a diffusers pipeline (or a (tokenizer, text_encoder) pair) whose tokenizer knows the placeholder.
        placeholder: the learned token ("<cat-toy>", or "sks" for DreamBooth); multi-vector tokens
            (placeholder, placeholder_1, ...) are adjusted row by row toward the class word.
        class_word: a word that is one token of the vocabulary ("dog"); c is its input-embedding row.
        rotation, scale: in [0, 1]; None takes tea.DEFAULTS[method].
    Yields a TeaAdjustment with the rows written. Restores on exceptions too; not thread-safe
    (it edits the model in place, so do not use the pipeline from another thread meanwhile).
    """
    rotation, scale = check_knobs(method, rotation, scale)
    stack = model_stack(pipe) if hasattr(pipe, "unet") else None
    if stack is not None and len(stack) > 1:  # SDXL: each encoder's rows toward its own class-word row
        holding = [e for e in stack if single_token_id(e.tokenizer, placeholder) is not None]
        if not holding:
            _placeholder_ids(stack.primary.tokenizer, stack.primary.encoder, placeholder)  # raises, saying how to load
        with contextlib.ExitStack() as written:
            done = [written.enter_context(_tea_rows(e.tokenizer, e.encoder, placeholder, class_word, rotation, scale,
                                                    e.name)) for e in holding]
            first = done[0]
            yield TeaAdjustment(first.placeholder_ids, first.class_id, rotation, scale, first.original, first.adjusted,
                                first.encoder, tuple(done))
        return
    tokenizer, encoder = prompt_parts(pipe)
    if tokenizer is None or encoder is None:
        raise ValueError("tea needs a pipeline with a tokenizer and a text_encoder (or a (tokenizer, text_encoder) pair)")
    with _tea_rows(tokenizer, encoder, placeholder, class_word, rotation, scale) as adjustment:
        yield adjustment


@contextmanager
def _tea_rows(tokenizer: Any, encoder: Any, placeholder: str, class_word: str, rotation: float, scale: float,
              name: str = "") -> Iterator[TeaAdjustment]:
    """Eq. 1 written into one encoder's placeholder rows, restored on exit."""
    ids = _placeholder_ids(tokenizer, encoder, placeholder)
    cid = _class_id(tokenizer, class_word, ids)
    weight = encoder.get_input_embeddings().weight
    if weight.device.type == "meta":
        raise ValueError(
            "the text encoder's weights are on the meta device (enable_sequential_cpu_offload); TEA writes them in "
            "place, so use enable_model_cpu_offload or keep the text encoder in memory"
        )
    with torch.no_grad():
        adjusted = slerp_adjust(weight[ids].detach(), weight[cid].detach(), rotation, scale).to(weight.dtype)
    with PlaceholderRows(adjusted, ids).written(encoder) as original:
        yield TeaAdjustment(tuple(ids), cid, rotation, scale, original, adjusted.clone(), name)


# ----------------------------------------------------------------------------- prompt level (Eq. 2)


def _prompt_list(p: str | Sequence[str], name: str) -> list[str]:
    """One prompt or a list of prompts as a non-empty list of strings."""
    out = [p] if isinstance(p, str) else list(p)
    if not out or not all(isinstance(x, str) for x in out):
        raise ValueError(f"{name} must be a prompt or a non-empty list of prompts; got {p!r}")
    return out


def _encode(tokenizer: Any, encoder: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, L], last hidden states [B, L, D]) exactly as StableDiffusionPipeline.encode_prompt makes them."""
    tok = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = encoder.device
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tok.attention_mask.to(device)
    hidden = encoder(tok.input_ids.to(device), attention_mask=mask)[0]
    return tok.input_ids, hidden.to(dtype=encoder.dtype, device=device)


def _span_start(ids: list[int], ph: list[int]) -> int | None:
    """The first position where the placeholder's ids occur in ids."""
    return next((k for k in range(len(ids) - len(ph) + 1) if ids[k : k + len(ph)] == ph), None)


@torch.no_grad()
def encode_prompt_level(
    pipe: Pipeline,
    prompt_personal: str | Sequence[str],
    prompt_class: str | Sequence[str],
    rotation: float | None = None,
    scale: float | None = None,
    aligned: bool = True,
    negative_prompt: str | Sequence[str] = "",
    *,
    placeholder: str = "sks",
    class_word: str | None = None,
    anchor_encoder: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-level TEA (Eq. 2) for DreamBooth: (prompt_embeds, negative_prompt_embeds), both [B, L, D].

    Both prompts go through the pipeline's tokenizer and (fine-tuned) text encoder; each position of
    the personalized prompt is SLERP-adjusted toward its counterpart in the class prompt. Pass the
    result as ``pipe(prompt_embeds=..., negative_prompt_embeds=...)``.

    Args:
        prompt_personal: e.g. "a photo of sks dog"; must contain `placeholder`. A list gives a batch.
        prompt_class: the same prompt with the class word and without the placeholder ("a photo of dog");
            one for all rows or one per row.
        rotation, scale: in [0, 1]; None takes tea.DEFAULTS["dreambooth"] (0.1, 0.5).
        aligned: True pairs the placeholder (with the class word after it, if any) with the class word
            and every other token with the same token; False pairs position k with k, the public
            code's behaviour, which shifts every token after the placeholder by one (for comparison).
        negative_prompt: encoded plainly; both models read the same negative text, so Eq. 2 leaves it unchanged.
        placeholder: the learned or rare token ("sks"; a Textual Inversion token works too).
        class_word: the class token; None reads it from the class prompt at the placeholder's position.
        anchor_encoder: the text encoder that encodes the class prompt (the anchor); None: the pipeline's own
            (fine-tuned) one, as in the paper. The authors' follow-up work anchors on the base model's encoder:
            pass a copy of it taken before the DreamBooth weights were loaded.
    """
    rotation, scale = check_knobs("dreambooth", rotation, scale)
    tokenizer, encoder = prompt_parts(pipe)
    if tokenizer is None or encoder is None:
        raise ValueError("encode_prompt_level needs a pipeline with a tokenizer and a text_encoder, or that pair")
    personal = _prompt_list(prompt_personal, "prompt_personal")
    classes = _prompt_list(prompt_class, "prompt_class")
    if len(classes) == 1:
        classes = classes * len(personal)
    if len(classes) != len(personal):
        raise ValueError(f"got {len(personal)} personalized prompts but {len(classes)} class prompts; pass 1 or the same number")
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(personal)
    if len(negatives) != len(personal):
        raise ValueError(f"got {len(personal)} prompts but {len(negatives)} negative prompts; pass 1 or the same number")
    ph = _placeholder_ids(tokenizer, encoder, placeholder)
    if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector TI tokens expand to "tok tok_1 ...", as in the pipeline
        personal = pipe.maybe_convert_prompt(personal, tokenizer)
        classes = pipe.maybe_convert_prompt(classes, tokenizer)
        negatives = pipe.maybe_convert_prompt(negatives, tokenizer)
    fixed_cid = None if class_word is None else _class_id(tokenizer, class_word, ph)

    ids_p, h_p = _encode(tokenizer, encoder, personal)
    ids_c, h_c = _encode(tokenizer, anchor_encoder if anchor_encoder is not None else encoder, classes)
    _, h_neg = _encode(tokenizer, encoder, negatives)
    pairs = []
    for b, (pp, pc) in enumerate(zip(personal, classes)):
        row_p, row_c = ids_p[b].tolist(), ids_c[b].tolist()
        start = _span_start(row_p, ph)
        if start is None:
            raise ValueError(
                f"prompt {pp!r} does not contain the placeholder {placeholder!r} (as a token of its own; within the "
                f"first {tokenizer.model_max_length} tokens)"
            )
        if _span_start(row_c, ph) is not None:
            raise ValueError(f"class prompt {pc!r} contains the placeholder {placeholder!r}; write it with the class word only")
        cid = fixed_cid if fixed_cid is not None else row_c[start]
        try:
            pairs.append(align_positions(row_p, row_c, ph, cid))
        except ValueError as err:
            hint = "" if class_word is not None else " (the class word was read from the class prompt; pass class_word=)"
            raise ValueError(f"cannot pair {pp!r} with {pc!r}: {err}{hint}") from None
    out = prompt_level_adjust(h_p, h_c, rotation, scale, pairs if aligned else None)
    return out.to(h_p.dtype), h_neg
