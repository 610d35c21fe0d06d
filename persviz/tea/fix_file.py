"""Token-level TEA baked into a file (``persviz fix``): the repaired token works in any tool that reads the format.

    result = fix_embedding("learned_embeds.safetensors", pipe, "dog", "fixed.safetensors")
    pipe.load_textual_inversion("fixed.safetensors")   # the same images as `with tea(pipe, "<tok>", "dog"):`

Each row V* of the file becomes slerp_adjust(V*, c, rotation, scale) (Eq. 1) with c the class word's input
embedding, exactly what ``persviz.tea.tea`` writes into the model at test time; the new file keeps the input's
format, container, dtype, keys and metadata (persviz.embedding_files.write_like) and is written atomically. An A1111
image embedding (a picture) becomes a float32 ``.safetensors`` {token: [n, D]} (``write_portable``), which A1111,
kohya and diffusers load; an embedding with NaN or Inf rows is refused (it is broken, not collapsed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from persviz.embedding_files import EmbeddingFileError, check_fits, read_embedding_file, write_like, write_portable
from persviz.embeddings import class_word_id, norm_ratio_and_cosine, prompt_parts, single_token_id
from persviz.tea.adjust import slerp_adjust
from persviz.tea.pipeline import check_knobs


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

    def to_text(self) -> str:
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
    if f.broken_rows:
        raise EmbeddingFileError(f"{f.path.name} is broken: {', '.join(f.broken_rows[:8])} hold NaN or Inf values (a "
                                 "diverged training step), which TEA cannot repair; retrain or take an earlier snapshot")
    tokenizer, encoder = prompt_parts(pipe_or_parts, required=True)
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
