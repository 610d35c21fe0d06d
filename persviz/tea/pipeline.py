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

from persviz.families import DEFAULT_FAMILY, family_of, is_pipeline, text_stack
from persviz.families.base import Pipeline
from persviz.embeddings import prompt_parts, single_token_id, tokens_of, class_word_id, token_row
from persviz.tea.adjust import DEFAULTS, check_knob, align_positions, align_spans, prompt_level_adjust, slerp_adjust
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
    if not is_pipeline(obj):
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


def _class_ids(tokenizer: Any, class_word: str, placeholder_ids: Sequence[int]) -> list[int]:
    """The ids of a class word's tokens (one or several) in a SentencePiece tokenizer; refused with a sentence when
    it is empty or the placeholder itself."""
    if not isinstance(class_word, str) or not class_word.strip() or any(c.isspace() for c in class_word.strip()):
        raise ValueError(f"class word must be one word, e.g. 'dog'; got {class_word!r}")
    ids = [int(i) for i in tokenizer(class_word.strip(), add_special_tokens=False)["input_ids"]]
    if not ids or ids == list(placeholder_ids):
        raise ValueError(f"class word {class_word!r} is the placeholder itself or no token; pass the class word "
                         "(e.g. 'dog')")
    return ids


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
    stack = model_stack(pipe) if is_pipeline(pipe) else None
    if stack is not None and len(stack) > 1:  # SDXL: each encoder's rows toward its own class-word row
        holding = [e for e in stack if single_token_id(e.tokenizer, placeholder) is not None]
        if not holding:
            _placeholder_ids(stack.primary.tokenizer, stack.primary.encoder, placeholder)  # raises, saying how to load
        with contextlib.ExitStack() as written:
            done = [written.enter_context(_tea_rows(e.tokenizer, e.encoder, placeholder, class_word, rotation, scale,
                                                    e.name, e.pieces)) for e in holding]
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
              name: str = "", pieces: bool = False) -> Iterator[TeaAdjustment]:
    """Eq. 1 written into one encoder's placeholder rows, restored on exit. pieces (a SentencePiece encoder, Flux's
    T5): a class word of several tokens gives c as the mean of their rows (class_id: its first token)."""
    ids = _placeholder_ids(tokenizer, encoder, placeholder)
    class_ids = _class_ids(tokenizer, class_word, ids) if pieces else [_class_id(tokenizer, class_word, ids)]
    cid = class_ids[0]
    weight = encoder.get_input_embeddings().weight
    if weight.device.type == "meta":
        raise ValueError(
            "the text encoder's weights are on the meta device (enable_sequential_cpu_offload); TEA writes them in "
            "place, so use enable_model_cpu_offload or keep the text encoder in memory"
        )
    with torch.no_grad():
        target = weight[class_ids].detach().mean(dim=0)
        adjusted = slerp_adjust(weight[ids].detach(), target, rotation, scale).to(weight.dtype)
    with PlaceholderRows(adjusted, ids).written(encoder) as original:
        yield TeaAdjustment(tuple(ids), cid, rotation, scale, original, adjusted.clone(), name)


# ----------------------------------------------------------------------------- prompt level (Eq. 2)


def _prompt_list(p: str | Sequence[str], name: str) -> list[str]:
    """One prompt or a list of prompts as a non-empty list of strings."""
    out = [p] if isinstance(p, str) else list(p)
    if not out or not all(isinstance(x, str) for x in out):
        raise ValueError(f"{name} must be a prompt or a non-empty list of prompts; got {p!r}")
    return out


def _tokens(tokenizer: Any, prompts: list[str]) -> Any:
    """The tokenizer's output for prompts, padded to its maximum length, as the pipelines' encode_prompt makes it."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def prompt_family(pipe: Any) -> tuple[Any, TextStack]:
    """(the family that says what its pipeline reads for prompts, the text stack): a pipeline's own; a (tokenizer,
    text_encoder) pair is read as SD 1.x's one encoder."""
    if is_pipeline(pipe):
        return family_of(pipe), text_stack(pipe)
    return DEFAULT_FAMILY, model_stack(pipe)


def _anchors(anchor_encoder: Any, stack: TextStack) -> list[Any]:
    """The encoder of each of the stack's encoders that encodes the class prompt."""
    if anchor_encoder is None:
        return [e.encoder for e in stack]
    if len(stack) == 1 and not isinstance(anchor_encoder, (tuple, list)):
        return [anchor_encoder]
    if not isinstance(anchor_encoder, (tuple, list)) or len(anchor_encoder) != len(stack):
        raise ValueError(f"anchor_encoder must be one text encoder per encoder of the pipeline, in order "
                         f"({', '.join(e.name for e in stack)}); got {type(anchor_encoder).__name__}")
    return list(anchor_encoder)


def embeds_kwargs(embeds: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """encode_prompt_level's tuple as the keyword arguments of the pipeline: (prompt_embeds,
    negative_prompt_embeds) and, where the family has a pooled embedding (SDXL), (pooled_prompt_embeds,
    negative_pooled_prompt_embeds): diffusers' encode_prompt order."""
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    if len(embeds) not in (2, 4):
        raise ValueError(f"expected the 2 or 4 tensors encode_prompt_level returns; got {len(embeds)}")
    return dict(zip(names, embeds))


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
    negative_prompt: str | Sequence[str] | None = None,
    *,
    placeholder: str = "sks",
    class_word: str | None = None,
    anchor_encoder: Any = None,
    adjust_pooled: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Prompt-level TEA (Eq. 2) for DreamBooth: the pipeline's encoded prompts with every position adjusted.

    Both prompts go through the pipeline's tokenizers and (fine-tuned) text encoders, as its ``encode_prompt``
    encodes them (the family says what the UNet reads: persviz.families.base.Family.prompt_states); each position
    of the personalized prompt is SLERP-adjusted toward its counterpart in the class prompt, in each text encoder's
    own hidden states (SDXL: clip_l's 768-wide and clip_g's 1280-wide parts of the 2048-wide state separately, each
    with its own norms), and a pooled embedding (SDXL's clip_g ``text_embeds``) toward the class prompt's pooled
    embedding. Returns what the pipeline's ``encode_prompt`` returns, in its order: SD 1.x ``(prompt_embeds,
    negative_prompt_embeds)`` [B, L, D]; SDXL ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
    negative_pooled_prompt_embeds)``. Pass them as ``pipe(**embeds_kwargs(result))``.

    Args:
        prompt_personal: e.g. "a photo of sks dog"; must contain `placeholder`. A list gives a batch.
        prompt_class: the same prompt with the class word and without the placeholder ("a photo of dog");
            one for all rows or one per row.
        rotation, scale: in [0, 1]; None takes tea.DEFAULTS["dreambooth"] (0.1, 0.5).
        aligned: True pairs the placeholder (with the class word after it, if any) with the class word
            and every other token with the same token; False pairs position k with k, the public
            code's behaviour, which shifts every token after the placeholder by one (for comparison).
        negative_prompt: encoded plainly; both models read the same negative text, so Eq. 2 leaves it unchanged.
            None does what the pipeline does without one: SD 1.x encodes "", SDXL (force_zeros_for_empty_prompt)
            passes zeros.
        placeholder: the learned or rare token ("sks"; a Textual Inversion token works too).
        class_word: the class token; None reads it from the class prompt at the placeholder's position.
        anchor_encoder: the text encoder that encodes the class prompt (the anchor); None: the pipeline's own
            (fine-tuned) one, as in the paper; one per encoder, in order, for a pipeline of several (SDXL). The
            authors' follow-up work anchors on the base model's encoder: pass a copy of it taken before the
            DreamBooth weights were loaded.
        adjust_pooled: whether the pooled embedding (SDXL) is adjusted too (the TEA authors' code adjusts it).
    """
    rotation, scale = check_knobs("dreambooth", rotation, scale)
    family, stack = prompt_family(pipe)
    personal = _prompt_list(prompt_personal, "prompt_personal")
    classes = _prompt_list(prompt_class, "prompt_class")
    if len(classes) == 1:
        classes = classes * len(personal)
    if len(classes) != len(personal):
        raise ValueError(f"got {len(personal)} personalized prompts but {len(classes)} class prompts; pass 1 or the same number")
    zero_negative = negative_prompt is None and bool(getattr(getattr(pipe, "config", None),
                                                             "force_zeros_for_empty_prompt", False))
    negatives = _prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(personal)
    if len(negatives) != len(personal):
        raise ValueError(f"got {len(personal)} prompts but {len(negatives)} negative prompts; pass 1 or the same number")
    anchors = _anchors(anchor_encoder, stack)
    states = family.state_encoders(stack)  # the encoders whose hidden states are prompt_embeds (Flux: T5 alone)
    toks_p, toks_c, toks_n, pairs = [], [], [], []
    for e in stack:
        pe, ce, ne = personal, classes, negatives
        if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector TI tokens expand to "tok tok_1 ...", as in the pipeline
            pe, ce, ne = (pipe.maybe_convert_prompt(x, e.tokenizer) for x in (personal, classes, negatives))
        toks_p.append(_tokens(e.tokenizer, pe))
        toks_c.append(_tokens(e.tokenizer, ce))
        toks_n.append(_tokens(e.tokenizer, ne))
        if e.name not in states:
            pairs.append(None)  # read through the pooled embedding only (Flux's clip_l)
        elif e.pieces:
            pairs.append(_span_pairs(e.tokenizer, pe, ce, toks_p[-1].input_ids, toks_c[-1].input_ids, placeholder,
                                     class_word))
        else:
            pairs.append(_pairs(e.tokenizer, e.encoder, pe, ce, toks_p[-1].input_ids, toks_c[-1].input_ids,
                                placeholder, class_word))
    h_p, pooled_p = family.prompt_states(stack, toks_p)
    anchor_stack = TextStack(tuple(TextEncoder(e.name, e.tokenizer, a, e.pieces) for e, a in zip(stack, anchors)))
    h_c, pooled_c = family.prompt_states(anchor_stack, toks_c)
    keep = [k for k, e in enumerate(stack) if e.name in states]
    adjusted = [prompt_level_adjust(h_p[k], h_c[k], rotation, scale, pairs[k] if aligned else None).to(h_p[k].dtype)
                for k in keep]
    prompt_embeds = torch.cat(adjusted, dim=-1)
    if zero_negative:
        negative_embeds = torch.zeros_like(prompt_embeds)
        negative_pooled = None if pooled_p is None else torch.zeros_like(pooled_p)
    else:
        h_n, negative_pooled = family.prompt_states(stack, toks_n)
        negative_embeds = torch.cat([h_n[k] for k in keep], dim=-1)
    if pooled_p is None:
        return prompt_embeds, negative_embeds
    pooled = pooled_p
    if adjust_pooled:
        pooled = slerp_adjust(pooled_p, pooled_c.to(pooled_p.device), rotation, scale).to(pooled_p.dtype)
    return prompt_embeds, negative_embeds, pooled, negative_pooled


def _span_pairs(tokenizer: Any, personal: list[str], classes: list[str], ids_p: torch.Tensor, ids_c: torch.Tensor,
                placeholder: str, class_word: str | None) -> list[list[tuple[int, int]]]:
    """Per prompt, align_spans' pairs of a SentencePiece encoder's token ids (Flux's T5): the placeholder as the
    tokenizer splits it (one added token, or pieces: "sks" is "▁sk" "s"), the class word as its tokens (read from the
    class prompt's word where the placeholder's word stands when class_word is None)."""
    ph = [int(i) for i in tokenizer(placeholder, add_special_tokens=False)["input_ids"]]
    out = []
    for b, (pp, pc) in enumerate(zip(personal, classes)):
        word = class_word
        if word is None:
            words_p, words_c = pp.split(), pc.split()
            if placeholder not in words_p or words_p.index(placeholder) >= len(words_c):
                raise ValueError(f"cannot find the class word of {pc!r} where {placeholder!r} stands in {pp!r}; "
                                 "pass class_word=")
            word = words_c[words_p.index(placeholder)].strip(".,;:!?")
        try:
            out.append(align_spans(ids_p[b].tolist(), ids_c[b].tolist(), ph, _class_ids(tokenizer, word, ph)))
        except ValueError as err:
            raise ValueError(f"cannot pair {pp!r} with {pc!r}: {err}") from None
    return out


def _pairs(tokenizer: Any, encoder: Any, personal: list[str], classes: list[str], ids_p: torch.Tensor,
           ids_c: torch.Tensor, placeholder: str, class_word: str | None) -> list[list[tuple[int, int]]]:
    """Per prompt, align_positions' pairs of one encoder's token ids (its tokenizer's placeholder and class ids)."""
    ph = _placeholder_ids(tokenizer, encoder, placeholder)
    fixed_cid = None if class_word is None else _class_id(tokenizer, class_word, ph)
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
    return pairs
