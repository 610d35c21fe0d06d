"""Where each word looks on FLUX.1: word maps from the transformer's joint attention, the image unchanged.

    with joint_attention_maps(pipe, words=["<v*>", "beach"]) as maps:
        images = pipe("a photo of <v*> on a beach", generator=g).images
    maps.maps["<v*>"]     # [images, h, w] the image tokens' attention to the word's T5 tokens, on the 2x2-packed grid
    maps.shares["<v*>"]   # [images] the word's share of the attention on the prompt's word tokens
    maps.special          # {"end", "padding"}: [images] shares of the image-to-text attention, reported beside
    maps.text_mass        # [images] the share of the image tokens' attention that goes to text tokens at all

FLUX.1 has no cross-attention: each of its 19 double-stream blocks attends jointly over the concatenated [text; image]
tokens (T5's prompt_embeds, then the 2x2-packed latents), with one softmax over all keys. The collector wraps the
attention processor of every double-stream block (``transformer.transformer_blocks[i].attn``), calls it unchanged
(so the image is the same, bit for bit), and beside it recomputes the softmax of that call from the processor's own
inputs: the projections (``to_q``/``to_k`` on the image stream, ``add_q_proj``/``add_k_proj`` on the text stream;
a peft LoRA inside them is seen), the RMS norms ``norm_q``, ``norm_k``, ``norm_added_q``, ``norm_added_k``, the
rotary embedding of the call, scale 1/sqrt(head_dim) as scaled_dot_product_attention; then keeps the image-query to
text-key block of it, mean over heads, summed over blocks and sampler steps and divided by their count. The 38
single-stream blocks attend over the same concatenated tokens inside one fused block; they are not collected
(``blocks`` says so): the maps are the double-stream blocks' alone.

Words map to T5 token positions through ``tokenizer_2`` (after ``pipe.maybe_convert_prompt``; a word of several
SentencePiece tokens sums its tokens, a word found several times sums every occurrence, a multi-vector placeholder
``<v*>``, ``<v*>_1``, ... is one word). Shares are over the prompt's word tokens (before ``</s>``); ``</s>`` and the
padding are reported in ``special`` as shares of the image-to-text attention. With ``true_cfg_scale`` above 1 the
pipeline calls the transformer twice a step; only the first call of each timestep (the prompt's) is collected.
Memory: float32 [images, image tokens, text tokens] for the sum, whatever the number of steps and blocks; the
softmax is recomputed one head at a time.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from persviz.attention import inside_share
from persviz.families.base import Pipeline

__all__ = ["JointAttentionMaps", "joint_attention_maps", "joint_probabilities", "t5_word_positions"]


@dataclass
class JointAttentionMaps:
    """What ``joint_attention_maps`` collected; filled when the ``with`` block ends."""

    words: tuple[str, ...]
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # word: [images, h, w]
    shares: dict[str, torch.Tensor] = field(default_factory=dict)  # word: [images]
    special: dict[str, torch.Tensor] = field(default_factory=dict)  # "end", "padding": [images]
    text_mass: Optional[torch.Tensor] = None  # [images]
    positions: dict[str, list[int]] = field(default_factory=dict)  # word: its T5 token positions
    block: Optional[torch.Tensor] = None  # [images, image tokens, text tokens]: the aggregate itself
    grid: tuple[int, int] = (0, 0)  # the packed latent grid (h, w): image side / 16 on FLUX.1
    calls: int = 0  # block calls collected (double-stream blocks x steps)
    blocks: str = "double-stream blocks only (the single-stream blocks are not collected)"

    def region_shares(self, word: str, mask: Any) -> torch.Tensor:
        """[images] the share of the word's map inside ``mask`` (a fractional [H, W] or [images, H, W] region,
        area-averaged to the packed grid), as AttentionMaps.region_shares on SD."""
        if word not in self.maps:
            raise KeyError(f"word {word!r} was not collected; collected: {self.words}")
        return inside_share(self.maps[word], mask)

    def leak(self, word: str, mask: Any) -> torch.Tensor:
        """[images] the share of the word's map outside ``mask`` (its region): 1 minus region_shares; the word
        grid of SD (persviz.attention_plots.word_grid) takes these maps as they are."""
        return 1 - self.region_shares(word, mask)


def joint_probabilities(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        image_rotary_emb: Any = None, head: int | None = None) -> torch.Tensor:
    """The softmax of one FluxAttention call as FluxAttnProcessor computes it: [B, heads, image tokens, text + image
    tokens] (head: that head alone, [B, image tokens, keys]), float32; keys in the processor's order, text first."""
    from diffusers.models.embeddings import apply_rotary_emb  # heavy: diffusers

    if attn.fused_projections:
        query, key, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        encoder_query, encoder_key, _ = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
        encoder_query, encoder_key = attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
    encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
    query, key = torch.cat([encoder_query, query], dim=1), torch.cat([encoder_key, key], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    n_txt = encoder_hidden_states.shape[1]
    q = query[:, n_txt:].float()  # the image tokens' queries [B, N_img, H, d]
    k = key.float()
    scale = 1.0 / math.sqrt(attn.head_dim)
    heads = range(q.shape[2]) if head is None else [head]
    out = [torch.softmax(torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h]) * scale, dim=-1) for h in heads]
    return out[0] if head is not None else torch.stack(out, dim=1)


def t5_word_positions(tokenizer: Any, ids: Sequence[int], words: Sequence[str]) -> dict[str, list[int]]:
    """Each word's positions in a T5 prompt's ids: every occurrence of its tokens (a word of several SentencePiece
    tokens: all of them), and of its extra vectors word_1, word_2, ... when they are added tokens."""
    ids = [int(i) for i in ids]
    added = getattr(tokenizer, "added_tokens_encoder", {})
    out = {}
    for w in words:
        pieces = [tokenizer(w, add_special_tokens=False).input_ids]
        i = 1
        while f"{w}_{i}" in added:
            pieces.append([added[f"{w}_{i}"]])
            i += 1
        found: list[int] = []
        for p in pieces:
            found += [k + j for k in range(len(ids) - len(p) + 1) if ids[k:k + len(p)] == p for j in range(len(p))]
        if not found:
            raise ValueError(f"word {w!r} is not in the prompt's T5 tokens ({tokenizer.convert_ids_to_tokens(ids)[:16]}"
                             f" ...); pass a word of the prompt")
        out[w] = sorted(set(found))
    return out


class _Wrapped:
    """A double-stream block's processor, called unchanged; its call's image-to-text softmax added to the sum."""

    def __init__(self, original: Any, collector: "_JointCollector") -> None:
        self.original, self.collector = original, collector

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if self.collector.active and encoder_hidden_states is not None:
            with torch.no_grad():
                n_txt = encoder_hidden_states.shape[1]
                mean = None
                for h in range(attn.heads):
                    p = joint_probabilities(attn, hidden_states, encoder_hidden_states, image_rotary_emb, head=h)
                    mean = p[..., :n_txt] if mean is None else mean + p[..., :n_txt]
                self.collector.add(mean / attn.heads)
        return out


class _JointCollector:
    def __init__(self, pipe: Pipeline, result: JointAttentionMaps, prompt: Optional[str]) -> None:
        self.pipe, self.result, self.prompt = pipe, result, prompt
        self.sum: Optional[torch.Tensor] = None
        self.count = 0
        self.seen: set[float] = set()
        self.active = False
        self.grid = (0, 0)
        self.max_sequence_length: Optional[int] = None

    def pre_hook(self, module: Any, args: Any, kwargs: dict) -> None:
        t = kwargs.get("timestep")
        key = float(t.flatten()[0]) if t is not None else float(len(self.seen))
        self.active = key not in self.seen  # the first call of a step: the prompt's (true CFG calls again)
        self.seen.add(key)
        ids = kwargs.get("img_ids")
        if ids is not None:
            self.grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)

    def add(self, block: torch.Tensor) -> None:
        block = block.detach().float().cpu()
        self.sum = block if self.sum is None else self.sum + block
        self.count += 1

    def encode_prompt_wrapper(self, original: Any) -> Any:
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            prompt = kwargs.get("prompt", args[0] if args else None)
            if self.prompt is None and prompt is not None:
                self.prompt = prompt if isinstance(prompt, str) else prompt[0]
            self.max_sequence_length = kwargs.get("max_sequence_length", self.max_sequence_length)
            return original(*args, **kwargs)
        return encode_prompt

    def finish(self) -> None:
        r = self.result
        if self.sum is None:
            raise ValueError("no double-stream block ran inside the block: call the pipeline inside "
                             "`with joint_attention_maps(pipe, words) as maps:`")
        if self.prompt is None:
            raise ValueError("the prompt is not known (the pipeline was called with prompt_embeds); pass prompt=")
        block = self.sum / self.count  # [B, N_img, L]
        tok = self.pipe.tokenizer_2
        text = self.pipe.maybe_convert_prompt(self.prompt, tok) if hasattr(self.pipe, "maybe_convert_prompt") \
            else self.prompt
        ids = tok(text, padding="max_length", max_length=block.shape[-1], truncation=True).input_ids
        n = ids.index(tok.eos_token_id) if tok.eos_token_id in ids else len(ids)
        r.positions = t5_word_positions(tok, ids[:n], r.words)
        h, w = self.grid if self.grid != (0, 0) else (int(math.isqrt(block.shape[1])),) * 2
        words_mass = block[..., :n].sum(dim=(1, 2))
        whole = block.sum(dim=(1, 2))
        for word, pos in r.positions.items():
            per_query = block[..., pos].sum(-1)  # [B, N_img]
            r.maps[word] = per_query.reshape(-1, h, w)
            r.shares[word] = per_query.sum(-1) / words_mass
        r.special = {"end": block[..., n].sum(-1).sum(-1) / whole if n < block.shape[-1] else torch.zeros(len(block)),
                     "padding": block[..., n + 1:].sum(dim=(1, 2)) / whole}
        r.text_mass = block.sum(-1).mean(-1)
        r.block, r.grid, r.calls = block, (h, w), self.count


@contextlib.contextmanager
def joint_attention_maps(pipe: Pipeline, words: Sequence[str], prompt: Optional[str] = None
                         ) -> Iterator[JointAttentionMaps]:
    """Collect word maps from a FLUX.1 pipeline's joint attention while it generates inside the block (see the
    module docstring); the processors and ``encode_prompt`` are restored on exit, also after an exception.

    Args:
        pipe: a FluxPipeline (its double-stream blocks' processors are wrapped, any class; FluxAttnProcessor's
            computation is the one recomputed).
        words: the words to map (each must be in the prompt's T5 tokens).
        prompt: the prompt, when the pipeline is called with prompt_embeds (TEA's prompt level); else read from
            the call.
    """
    transformer = getattr(pipe, "transformer", None)
    blocks = list(getattr(transformer, "transformer_blocks", []) or [])
    if not blocks or not hasattr(transformer, "single_transformer_blocks"):
        raise ValueError(f"{type(pipe).__name__} has no FLUX.1 transformer (double-stream transformer_blocks); "
                         "joint_attention_maps reads FLUX.1 pipelines, attention_maps SD ones")
    if isinstance(words, str) or not words:
        raise ValueError(f"words must be a non-empty list of words; got {words!r}")
    result = JointAttentionMaps(tuple(words))
    collector = _JointCollector(pipe, result, prompt)
    originals = [b.attn.processor for b in blocks]
    had_encode = "encode_prompt" in pipe.__dict__
    old_encode = pipe.__dict__.get("encode_prompt")
    handle = transformer.register_forward_pre_hook(collector.pre_hook, with_kwargs=True)
    try:
        for b, original in zip(blocks, originals):
            b.attn.processor = _Wrapped(original, collector)
        pipe.encode_prompt = collector.encode_prompt_wrapper(pipe.encode_prompt)
        yield result
        collector.finish()
    finally:
        handle.remove()
        for b, original in zip(blocks, originals):
            b.attn.processor = original
        if had_encode:
            pipe.encode_prompt = old_encode
        else:
            del pipe.__dict__["encode_prompt"]
