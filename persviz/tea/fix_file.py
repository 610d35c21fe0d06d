"""Token-level TEA baked into a file (``persviz fix``): the repaired token works in any tool that reads the format.

    result = fix_embedding("learned_embeds.safetensors", pipe, "dog", "fixed.safetensors")
    pipe.load_textual_inversion("fixed.safetensors")   # the same images as `with tea(pipe, "<tok>", "dog"):`

Each row V* of the file becomes slerp_adjust(V*, c, rotation, scale) (Eq. 1) with c the class word's input
embedding, exactly what ``persviz.tea.tea`` writes into the model at test time; the new file keeps the input's
format, container, dtype, keys and metadata (persviz.embedding_files.write_like) and is written atomically. An A1111
image embedding (a picture) becomes a float32 ``.safetensors`` {token: [n, D]} (``write_portable``), which A1111,
kohya and diffusers load; an embedding with NaN or Inf rows is refused (it is broken, not collapsed).

An SDXL embedding (a part per text encoder: kohya's, A1111/Forge's, ComfyUI's and diffusers' pivotal tuning's
``clip_l`` + ``clip_g``, or ``textual_inversion_sdxl.py``'s pair) against an SDXL model: each part's rows move toward
the class word's row of their own encoder (clip_l's toward clip_l's ``c``, clip_g's toward clip_g's), what ``tea``
does to a pipeline with the token loaded; written in the same layout (the pair as one ``clip_l`` + ``clip_g`` file).
An SD 1.x file against SDXL, or the reverse, is refused naming both families.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persviz.embedding_files import (SD15, SDXL_PAIR, EmbeddingFile, EmbeddingFileError, an, check_fits,
                                     read_embedding_file, write_like, write_parts_like, write_portable)
from persviz.embeddings import class_word_id, norm_ratio_and_cosine, single_token_id
from persviz.tea.adjust import slerp_adjust
from persviz.tea.inspect_file import PARTIAL_FORMATS, other_family
from persviz.tea.pipeline import check_knobs, model_stack


@dataclass(frozen=True)
class PartFix:
    """One text encoder's part of a per-encoder fix (SDXL: clip_l, clip_g)."""

    encoder: str
    width: int
    before: torch.Tensor  # [n, D] rows of the input (stored dtype)
    after: torch.Tensor  # [n, D] rows written (stored dtype)
    ratio_before: tuple[float, ...]
    cosine_before: tuple[float, ...]
    ratio_after: tuple[float, ...]
    cosine_after: tuple[float, ...]


@dataclass(frozen=True)
class FixResult:
    """What fix_embedding wrote."""

    source: Path
    out: Path
    format: str
    token: str
    class_word: str
    rotation: float
    scale: float
    before: torch.Tensor  # [n, D] rows of the input (stored dtype)
    after: torch.Tensor  # [n, D] rows written (stored dtype)
    ratio_before: tuple[float, ...]
    cosine_before: tuple[float, ...]
    ratio_after: tuple[float, ...]
    cosine_after: tuple[float, ...]
    written_format: str = ""  # the output's format when it differs from the input's (an image -> safetensors)
    parts: tuple[PartFix, ...] = ()  # a per-encoder file (SDXL): each encoder's rows; before/after are the first's

    def to_text(self) -> str:
        if self.parts:
            shapes = ", ".join(f"{p.encoder} [{p.before.shape[0]}, {p.width}]" for p in self.parts)
            lines = [f"wrote {self.out} ({self.format}, token {self.token!r}, {shapes}): TEA toward "
                     f"{self.class_word!r} in each encoder, rotation {self.rotation}, scale {self.scale}"]
            if self.written_format:
                lines.append(f"  the input is diffusers' textual_inversion_sdxl.py pair; the fixed token is written as "
                             f"{self.written_format}")
            for p in self.parts:
                for i in range(len(p.ratio_before)):
                    lines.append(f"  {p.encoder} row {i}: |V*|/|c| {p.ratio_before[i]:.2f} -> {p.ratio_after[i]:.2f}, "
                                 f"cos(V*, c) {p.cosine_before[i]:.3f} -> {p.cosine_after[i]:.3f}")
            return "\n".join(lines)
        lines = [f"wrote {self.out} ({self.format}, token {self.token!r}, {self.before.shape[0]} x "
                 f"{self.before.shape[1]}, {str(self.after.dtype).replace('torch.', '')}): TEA toward "
                 f"{self.class_word!r}, rotation {self.rotation}, scale {self.scale}"]
        if self.written_format:
            lines.append(f"  the input is an A1111 image embedding; the fixed token is written as {self.written_format}"
                         f" {{{self.token!r}: [{self.before.shape[0]}, {self.before.shape[1]}]}}, which A1111 (named "
                         f"after the file: {self.out.stem}), kohya and diffusers' load_textual_inversion load")
        for i in range(len(self.ratio_before)):
            lines.append(f"  row {i}: |V*|/|c| {self.ratio_before[i]:.2f} -> {self.ratio_after[i]:.2f}, "
                         f"cos(V*, c) {self.cosine_before[i]:.3f} -> {self.cosine_after[i]:.3f}")
        return "\n".join(lines)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def out_path(source: Path, out: str | os.PathLike, force: bool = False, portable: bool = False) -> Path:
    """Where the fixed file goes (a folder: the input's file name inside it, as .safetensors when portable);
    refuses the input and, without force, an existing file."""
    o = Path(out).expanduser()
    if o.is_dir():
        o = o / (source.stem + ".safetensors" if portable else source.name)
    if _same_file(source, o) or source.resolve() == o.resolve():
        raise EmbeddingFileError(f"--out {o} is the input file; fix never overwrites its input, so pick a new file name")
    if o.exists() and not force:
        raise EmbeddingFileError(f"{o} already exists; pick another --out or pass --force to replace it")
    return o


def fix_target(f: EmbeddingFile, out: str | os.PathLike, force: bool = False) -> Path:
    """Where fixing `f` writes (out_path): an A1111 image embedding and diffusers' SDXL pair become one .safetensors
    (the pair named after its token when --out is a folder)."""
    if f.format == "diffusers-sdxl":
        o = out_path(f.path.parent / f"{f.token}.safetensors", out, force, portable=True)
        for name in SDXL_PAIR.values():
            if _same_file(f.path.parent / name, o) or (f.path.parent / name).resolve() == o.resolve():
                raise EmbeddingFileError(f"--out {o} is one of the input's files; fix never overwrites its input, so "
                                         "pick a new file name")
        return o
    return out_path(f.path, out, force, portable=f.format == "a1111-image")


def fix_embedding(path: str | os.PathLike, pipe_or_parts: Any, class_word: str, out: str | os.PathLike,
                  rotation: float | None = None, scale: float | None = None, method: str = "textual_inversion",
                  force: bool = False, token: str | None = None) -> FixResult:
    """Write a new embedding file whose rows are TEA-adjusted toward `class_word`, in the input's format and dtype.

    Args:
        path: any file persviz.embedding_files reads (not SDXL); multi-vector tokens are adjusted row by row.
        pipe_or_parts: the pipeline (or (tokenizer, text_encoder)) the token was trained for; c is read from it.
        class_word: one token of the vocabulary ("dog").
        out: the new file (or a folder for a file of the input's name); never the input itself.
        rotation, scale: in [0, 1]; None takes tea.DEFAULTS[method] (textual_inversion: 0.2, 0.5).
        force: replace an existing `out`.
    Nothing is written when an argument is wrong (ValueError / EmbeddingFileError naming the problem).
    """
    rotation, scale = check_knobs(method, rotation, scale)
    f = read_embedding_file(path, token=token)
    broken = ([f"{k} {r}" for k, v in f.parts.items() for r in broken_rows(v, f.row_names)] if f.per_encoder
              else f.broken_rows)
    if broken:
        raise EmbeddingFileError(f"{f.path.name} is broken: {', '.join(broken[:8])} hold NaN or Inf values (a "
                                 "diverged training step), which TEA cannot repair; retrain or take an earlier snapshot")
    stack = model_stack(pipe_or_parts)
    if len(stack) > 1 or f.per_encoder:
        return _fix_parts(f, stack, class_word, out, rotation, scale, force)
    tokenizer, encoder = stack.primary.tokenizer, stack.primary.encoder
    check_fits(f, encoder)
    cid = class_word_id(tokenizer, class_word)
    if single_token_id(tokenizer, f.token) == cid:
        raise ValueError(f"class word {class_word!r} is the learned token itself; pass the class word (e.g. 'dog')")
    portable = f.format == "a1111-image"
    target = out_path(f.path, out, force, portable)
    weight = encoder.get_input_embeddings().weight.detach()
    c = weight[cid].cpu()
    # the operation `tea` does on the loaded rows (same inputs, same dtype promotion), stored in the file's dtype
    after = slerp_adjust(f.rows, c, rotation, scale).to(f.dtype)
    written = write_portable(f, after, target) if portable else write_like(f, after, target)
    rb, cb = norm_ratio_and_cosine(f.rows, c)
    ra, ca = norm_ratio_and_cosine(after, c)
    tup = lambda x: tuple(float(v) for v in x)  # noqa: E731
    return FixResult(f.path, written, f.format, f.token, class_word, rotation, scale, f.rows, after,
                     tup(rb), tup(cb), tup(ra), tup(ca), "float32 .safetensors" if portable else "")


def broken_rows(rows: torch.Tensor, names: list[str]) -> list[str]:
    bad = ~torch.isfinite(rows.float()).all(dim=-1)
    return [n for n, b in zip(names, bad.tolist()) if b]


def _fix_parts(f: EmbeddingFile, stack: Any, class_word: str, out: str | os.PathLike, rotation: float, scale: float,
               force: bool) -> FixResult:
    """Each encoder's part toward its own class-word row; refusals of a file and a model of different families."""
    encoders = list(stack)
    names = ", ".join(f"{e.name} {e.width} wide" for e in encoders)
    fam = stack.family_name if hasattr(stack, "family_name") else "SDXL"
    if not f.per_encoder:
        raise EmbeddingFileError(
            f"{f.path.name} holds rows of one text encoder ({f.n_vectors} x {f.width}, a Stable Diffusion 1.x-style "
            f"embedding) but the model is {an(fam)} {fam}-style model with {len(encoders)} text encoders ({names}); "
            f"fix it against the SD 1.x model it was trained on (e.g. --model {SD15}), or pass {an(fam)} {fam} "
            f"embedding with a part per encoder ({' + '.join(e.name for e in encoders)})")
    if len(encoders) == 1:
        check_fits(f, encoders[0].encoder)  # raises: an SDXL or FLUX.1 file against a one-encoder (SD 1.x) model
    if f.family != fam:
        raise EmbeddingFileError(other_family(f, fam, "", names, "fix"))
    if set(f.parts) and f.format in PARTIAL_FORMATS and set(f.parts) < {e.name for e in encoders}:
        encoders = [e for e in encoders if e.name in f.parts]  # ComfyUI's t5xxl alone: T5's rows fixed
    if sorted(f.parts) != sorted(e.name for e in encoders):
        raise EmbeddingFileError(f"{f.path.name} has parts {sorted(f.parts)} and the model's text encoders are "
                                 f"{names}; pass the model the embedding was trained on")
    for e in encoders:
        width = int(f.parts[e.name].shape[-1])
        if width != e.width:
            raise EmbeddingFileError(f"{f.path.name}: its {e.name} part is {width} wide but the model's {e.name} is "
                                     f"{e.width}: the embedding was trained on another model; pass that model")
    portable = f.format == "diffusers-sdxl"  # diffusers' pair: written as one clip_l + clip_g file
    target = fix_target(f, out, force)
    fixes, after = [], {}
    tup = lambda x: tuple(float(v) for v in x)  # noqa: E731
    for e in encoders:
        if e.pieces:  # a SentencePiece encoder (T5): the mean of the class word's rows, as tea() takes it
            c = e.rows.detach()[e.tokenizer(class_word, add_special_tokens=False)["input_ids"]].mean(dim=0).cpu()
        else:
            c = e.rows.detach()[class_word_id(e.tokenizer, class_word)].cpu()
        v = f.parts[e.name]
        after[e.name] = slerp_adjust(v, c, rotation, scale).to(v.dtype)  # what tea() writes into this encoder
        rb, cb = norm_ratio_and_cosine(v, c)
        ra, ca = norm_ratio_and_cosine(after[e.name], c)
        fixes.append(PartFix(e.name, e.width, v, after[e.name], tup(rb), tup(cb), tup(ra), tup(ca)))
    written = write_parts_like(f, after, target)
    first = fixes[0]
    return FixResult(f.path, written, f.format, f.token, class_word, rotation, scale, first.before, first.after,
                     first.ratio_before, first.cosine_before, first.ratio_after, first.cosine_after,
                     "one float32 clip_l + clip_g .safetensors" if portable else "", tuple(fixes))
