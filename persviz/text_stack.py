"""A diffusion pipeline's text encoders, in order, each with its tokenizer, name and width; and the one way persviz
makes a placeholder mean a vector in an encoder (``PlaceholderRows``).

    stack = text_stack(pipe)                     # persviz.families.text_stack: SD 1.x has one encoder, 'clip_l'
    stack.primary.tokenizer, stack.primary.encoder, stack.primary.width
    [e.name for e in stack]                      # ['clip_l']; SDXL has ['clip_l', 'clip_g']

Code that reaches a diffusion pipeline's tokenizer or text encoder goes through ``persviz.families.text_stack(pipe)``
(the family lays out its encoders), so a family
of several encoders (SDXL: clip_l and clip_g; Flux: clip_l and t5) needs no change there, only its family module.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline: its name ('clip_l'), tokenizer and model; pieces: its tokenizer splits
    ordinary words into several tokens (T5's SentencePiece), so TEA takes a class word of several tokens as one unit
    (docs/tea.md §2) where a CLIP encoder asks for a one-token word."""

    name: str
    tokenizer: Any
    encoder: Any
    pieces: bool = False  # a SentencePiece tokenizer (Flux's T5) that splits many words: a class word may be several


    @property
    def width(self) -> int:
        """The width of its token rows (768 for SD 1.x's CLIP ViT-L/14, 128 for ShapesWorld's micro CLIP)."""
        return int(self.rows.shape[-1])

    @property
    def rows(self) -> torch.Tensor:
        """The encoder's token-embedding matrix [vocabulary, width] (the parameter itself, not a copy)."""
        return self.encoder.get_input_embeddings().weight

    def word_row(self, word: str) -> torch.Tensor:
        """A copy of the row of a one-token word (a class word, a learned token); a ValueError for a word of
        several tokens."""
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens for the {self.name} tokenizer "
                             f"({self.tokenizer.tokenize(word)}); pick a word that is one token")
        return self.rows[int(ids[0])].detach().clone()

    def has_added(self, token: str) -> bool:
        """Whether `token` was added to the tokenizer (a learned token loaded into the pipeline)."""
        return token in self.tokenizer.get_added_vocab()


@dataclass(frozen=True)
class TextStack:
    """A pipeline's text encoders in the order the pipeline concatenates or uses them."""

    encoders: tuple[TextEncoder, ...]
    family: str = ""  # the family's name in sentences where its text stack sets it ('FLUX.1')

    @property
    def family_name(self) -> str:
        """The model family in sentences: the stack's own, else by its encoders (one: 'Stable Diffusion 1.x'; two
        without a name: SDXL, whose stack predates the field)."""
        return self.family or ("Stable Diffusion 1.x" if len(self.encoders) == 1 else "SDXL")

    def __iter__(self) -> Iterator[TextEncoder]:
        return iter(self.encoders)

    def __len__(self) -> int:
        return len(self.encoders)

    @property
    def primary(self) -> TextEncoder:
        """The first encoder (SD 1.x's only one)."""
        return self.encoders[0]

    def by_name(self, name: str) -> TextEncoder:
        """The encoder called `name`; a KeyError listing the names."""
        for e in self.encoders:
            if e.name == name:
                return e
        raise KeyError(f"no text encoder {name!r}; this pipeline has {[e.name for e in self.encoders]}")


class PlaceholderRows:
    """The one way persviz makes a placeholder mean a vector: rows [n, D] for the placeholder's n tokens.

    As a forward hook of a text encoder's input embedding (``with PlaceholderRows(rows).hooked(encoder):``, the
    trainers and the shift tracker): the output gets rows[sel] (cast to its dtype) where `mask` is set (the caller
    sets mask and sel per batch, e.g. from ``placeholder_positions``; None: the output as it is). The embedding
    matrix is not touched, so a float32 row (a leaf that trains) works inside a float16 encoder and no other row can
    change.

    Written into the matrix (``with PlaceholderRows(rows, ids).written(encoder):``, tea() and learned_embedding):
    for a pipeline that tokenizes prompts itself and already holds the tokens ids; rows cast to the matrix's dtype,
    the exact old rows written back on exit (also after an exception).
    """

    def __init__(self, rows: torch.Tensor, ids: Sequence[int] = ()) -> None:
        self.rows = rows
        self.ids = tuple(int(i) for i in ids)
        self.mask: torch.Tensor | None = None
        self.sel: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return output
        return torch.where(self.mask.unsqueeze(-1), self.rows.to(output.dtype)[self.sel], output)

    @contextlib.contextmanager
    def hooked(self, encoder: Any) -> Iterator["PlaceholderRows"]:
        """The hook on encoder's input embedding inside the block; removed (and mask cleared) on exit. Every
        embedding module that holds the input-embedding matrix is hooked (transformers' T5 reads its tied matrix
        through ``encoder.embed_tokens``, a module other than ``get_input_embeddings()``)."""
        weight = encoder.get_input_embeddings().weight
        modules = [m for m in encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is weight]
        handles = [m.register_forward_hook(self) for m in modules or [encoder.get_input_embeddings()]]
        try:
            yield self
        finally:
            self.mask = None
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def written(self, encoder: Any) -> Iterator[torch.Tensor]:
        """rows written into encoder's input-embedding matrix at ids inside the block; yields the old rows (a copy),
        written back on exit."""
        weight = encoder.get_input_embeddings().weight
        if len(self.ids) != len(self.rows):
            raise ValueError(f"{len(self.rows)} rows for {len(self.ids)} token ids")
        idx = torch.tensor(self.ids, device=weight.device)
        with torch.no_grad():
            original = weight[idx].detach().clone()
            weight[idx] = self.rows.to(weight.device, weight.dtype)
        try:
            yield original
        finally:
            with torch.no_grad():
                weight[idx] = original



__all__ = ["PlaceholderRows", "TextEncoder", "TextStack"]
