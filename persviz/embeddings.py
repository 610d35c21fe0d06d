"""Learned token embeddings (Textual Inversion files) and statistics of a text encoder's input-embedding matrix.

Reads the diffusers format ({token: [D] or [n, D]}, ``learned_embeds.safetensors`` / ``.bin``) and the
Automatic1111 formats (``string_to_param`` + ``name`` in a .pt, or ``emb_params`` in a .safetensors);
writes the diffusers format that ``pipe.load_textual_inversion(path)`` reads. The statistics are the
ones of TEA Sec. 3.2.3 (docs/tea.md §4): |V*| / |c|, cos(V*, c) and the norms of all vocabulary rows.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from persviz.families.base import Pipeline
from persviz.errors import PersvizError
from persviz.tokens import single_token_id
from persviz.embedding_files import TOKEN_METADATA
from persviz.io import PathLike, atomic_path
from persviz.families import is_pipeline, text_stack

DIFFUSERS_SAFE = "learned_embeds.safetensors"
DIFFUSERS_BIN = "learned_embeds.bin"


# ----------------------------------------------------------------------------- reading and writing


class EmbeddingLoadError(PersvizError, ValueError):
    """A learned-embedding file that does not load safely (damaged, or holding code)."""


def _read_file(path: Path) -> Mapping[str, Any]:
    """The raw state dict of a .safetensors, .bin or .pt file (a directory: its learned_embeds file)."""
    if path.is_dir():
        for name in (DIFFUSERS_SAFE, DIFFUSERS_BIN):
            if (path / name).is_file():
                return _read_file(path / name)
        raise FileNotFoundError(f"{path} is a folder without {DIFFUSERS_SAFE} or {DIFFUSERS_BIN}; pass the file itself")
    if not path.is_file():
        raise FileNotFoundError(f"no learned-embedding file at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many classes
        raise EmbeddingLoadError(
            f"could not read {path} as a torch file with weights_only=True ({type(err).__name__}: it is damaged or "
            f"holds code, not only tensors); convert it to .safetensors in a session you trust, or load it yourself "
            f"and pass the dict") from None


def _as_rows(x: Any, where: str) -> torch.Tensor:
    """One learned embedding as a float tensor [n, D] on the CPU."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where} must be a tensor [D] or [n, D]; got {type(x).__name__}")
    if x.ndim not in (1, 2) or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"{where} must be a tensor [D] or [n, D]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{where} must be floating point; got {x.dtype}")
    return x.detach().cpu().reshape(-1, x.shape[-1])


def _keys(sd: Mapping[str, Any]) -> str:
    """The keys of a state dict, for error messages."""
    keys = sorted(map(str, sd.keys()))
    return repr(keys[:10]) + (f" (and {len(keys) - 10} more)" if len(keys) > 10 else "")


def _merge_multi_vector(embeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack {tok: v0, tok_1: v1, ...} (diffusers' per-row names of a multi-vector token) into {tok: [n, D]}."""
    if len(embeds) < 2:
        return embeds
    roots = [k for k in embeds if not re.fullmatch(r".+_\d+", k)]
    if len(roots) != 1:
        return embeds
    root = roots[0]
    names = [root] + [f"{root}_{i}" for i in range(1, len(embeds))]
    if set(names) != set(embeds) or any(embeds[k].shape[0] != 1 for k in embeds):
        return embeds
    return {root: torch.cat([embeds[k] for k in names])}


def load_learned_embeds(
    path_or_dict: PathLike | Mapping[str, Any], token: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a learned embedding (diffusers or Automatic1111 format) as {token: float tensor [n, D]} on the CPU.

    Args:
        path_or_dict: a .safetensors/.bin/.pt file, a folder holding learned_embeds.safetensors/.bin,
            or an already loaded state dict. A1111 files take their token from `name` (.pt) or the
            file name (`emb_params` .safetensors).
        token: replaces the stored token name (only for a file or dict holding one token).
    Pass a one-token result to ``pipe.load_textual_inversion(result)`` to add it to a pipeline.
    """
    stem = None
    if isinstance(path_or_dict, Mapping):
        sd = path_or_dict
    elif isinstance(path_or_dict, (str, os.PathLike)):
        p = Path(path_or_dict).expanduser()
        sd = _read_file(p)
        stem = (p if p.is_file() else p / DIFFUSERS_SAFE).stem
        if not isinstance(sd, Mapping):
            raise ValueError(
                f"{p} holds a bare {type(sd).__name__}, not a dict; wrap it as {{token: tensor}} and pass the dict"
            )
    else:
        raise ValueError(f"path_or_dict must be a file path, a folder or a dict; got {type(path_or_dict).__name__}")
    if len(sd) == 0:
        raise ValueError("the learned-embedding file/dict is empty (no keys)")
    if "string_to_param" in sd:  # Automatic1111 .pt
        params = sd["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            inner = _keys(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"A1111 embedding: string_to_param must be {{'*': tensor[n, D]}}; found {inner}")
        name = sd.get("name") or stem
        if token is None and not name:
            raise ValueError("A1111 embedding without a 'name'; pass token='<your-token>'")
        out = {str(name): _as_rows(params["*"], "string_to_param['*']")}
    elif "emb_params" in sd:  # Automatic1111 .safetensors
        if token is None and not stem:
            raise ValueError("an 'emb_params' embedding carries no token name; pass token='<your-token>'")
        out = {str(stem): _as_rows(sd["emb_params"], "emb_params")}
    elif {"clip_l", "clip_g"} <= set(sd):
        raise ValueError(
            f"this is an SDXL embedding (keys found: {_keys(sd)}); for a StableDiffusionPipeline pass one text "
            f"encoder's part, e.g. load_learned_embeds({{'<token>': state_dict['clip_l']}})"
        )
    elif all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) for v in sd.values()):  # diffusers
        out = _merge_multi_vector({str(k): _as_rows(v, f"embedding {k!r}") for k, v in sd.items()})
    else:
        raise ValueError(
            f"unknown learned-embedding layout; keys found: {_keys(sd)}. Expected the diffusers format "
            f"{{token: tensor[D] or [n, D]}}, or Automatic1111's 'string_to_param' + 'name' (.pt) or "
            f"'emb_params' (.safetensors)."
        )
    if token is not None:
        if len(out) != 1:
            raise ValueError(f"token= renames a single embedding, but {len(out)} were found: {sorted(out)}")
        out = {token: next(iter(out.values()))}
    dims = {v.shape[-1] for v in out.values()}
    if len(dims) > 1:
        raise ValueError(f"the embeddings have different sizes D: { {k: v.shape[-1] for k, v in out.items()} }")
    return out


def save_learned_embeds(embeds: Mapping[str, torch.Tensor], path: PathLike) -> Path:
    """Write one token's embedding [D] or [n, D] in the diffusers format, atomically; returns the file written.

    `path` ending in .safetensors, .bin or .pt is the file; any other path is a folder that gets
    learned_embeds.safetensors. ``pipe.load_textual_inversion(path)`` reads the result. Per-row names
    {tok: v0, tok_1: v1} are stacked into one multi-vector token.
    """
    if not isinstance(embeds, Mapping) or not embeds:
        raise ValueError("embeds must be a non-empty dict {token: tensor[D] or [n, D]}")
    rows = _merge_multi_vector({str(k): _as_rows(v, f"embedding {k!r}") for k, v in embeds.items()})
    if len(rows) != 1:
        raise ValueError(
            f"the diffusers format holds one token per file and got {len(rows)}: {sorted(rows)}; "
            f"save each token to its own file"
        )
    (tok, value), = rows.items()
    value = value.contiguous().clone()
    p = Path(path).expanduser()
    if p.suffix not in (".safetensors", ".bin", ".pt"):
        p = p / DIFFUSERS_SAFE
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        if p.suffix == ".safetensors":
            save_file({tok: value}, str(tmp))
        else:
            torch.save({tok: value}, str(tmp))
    return p


def save_encoder_embeds(parts: Mapping[str, torch.Tensor], path: PathLike, token: str) -> Path:
    """Write one token's rows per text encoder, {encoder name: [n, D]} (SDXL: {"clip_l": [n, 768], "clip_g":
    [n, 1280]}, the layout kohya, A1111/Forge, ComfyUI and diffusers' pivotal tuning read), as a float32
    .safetensors, atomically; the token goes into the metadata (``TOKEN_METADATA``: those tools name it after the
    file). Returns the file written."""
    if not isinstance(parts, Mapping) or len(parts) < 2:
        raise ValueError("parts must map two or more encoder names to their rows [n, D]")
    rows = {str(k): _as_rows(v, f"rows of {k!r}").float().contiguous().clone() for k, v in parts.items()}
    if len({int(v.shape[0]) for v in rows.values()}) != 1:
        raise ValueError(f"every encoder needs as many rows: { {k: int(v.shape[0]) for k, v in rows.items()} }")
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise ValueError(f"{p.name}: a per-encoder embedding is written as a .safetensors file")
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        save_file(rows, str(tmp), metadata={"format": "pt", TOKEN_METADATA: str(token)})
    return p


def _rows_to_add(embeds: Any, token: str | None) -> int | None:
    """How many rows diffusers' load_textual_inversion will add for embeds (None when persviz cannot read it)."""
    if isinstance(embeds, torch.Tensor):
        return 1 if embeds.ndim == 1 else int(embeds.shape[0])
    try:
        return sum(int(v.shape[0]) for v in load_learned_embeds(embeds, token).values())
    except (ValueError, FileNotFoundError, TypeError):
        return None


def load_learned_token(pipe: Pipeline, embeds: Any, token: Any = None, text: Any = None) -> None:
    """``pipe.load_textual_inversion(embeds, token=token)`` without transformers' "mean_resizing" notice.

    The text encoder's embedding matrix is first grown to its final size with ``mean_resizing=False`` (diffusers then
    finds it large enough and writes every new row itself), so the result equals diffusers' own load. text: the
    encoder of the pipeline's text stack to load into (persviz.text_stack.TextEncoder; default the first: SDXL's
    clip_g part goes to its second, as diffusers' ``text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2``)."""
    text = text if text is not None else text_stack(pipe).primary
    encoder, n = text.encoder, _rows_to_add(embeds, token)
    before = encoder.get_input_embeddings().weight.shape[0]
    need = len(text.tokenizer) + (n or 0)
    grown = n is not None and need > before
    if grown:
        encoder.resize_token_embeddings(need, mean_resizing=False)
    try:
        pipe.load_textual_inversion(embeds, token=token, tokenizer=text.tokenizer, text_encoder=text.encoder)
    except BaseException:
        if grown and encoder.get_input_embeddings().weight.shape[0] == need:
            encoder.resize_token_embeddings(before)  # shrinking: the refused load leaves the matrix as it was
        raise


# ----------------------------------------------------------------------------- vocabulary rows


def prompt_parts(obj: Any, required: bool = False) -> tuple[Any, Any]:
    """(tokenizer or None, text encoder or None) of a pipeline (its text stack's first encoder), a (tokenizer,
    text_encoder) pair or either alone; required: both must be there (a ValueError saying what to pass otherwise)."""
    tokenizer, encoder = _prompt_parts(obj)
    if required and (tokenizer is None or encoder is None):
        raise ValueError("pass a pipeline with a tokenizer and a text_encoder, or a (tokenizer, text_encoder) pair")
    return tokenizer, encoder


def _prompt_parts(obj: Any) -> tuple[Any, Any]:
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    if hasattr(obj, "text_encoder") and hasattr(obj, "tokenizer") and is_pipeline(obj):
        text = text_stack(obj).primary  # a diffusion pipeline: its family lays out its encoders
        return text.tokenizer, text.encoder
    if hasattr(obj, "text_encoder") or hasattr(obj, "tokenizer"):
        return getattr(obj, "tokenizer", None), getattr(obj, "text_encoder", None)
    if hasattr(obj, "get_input_embeddings"):
        return None, obj
    if callable(obj) and hasattr(obj, "get_vocab"):
        return obj, None
    raise ValueError(
        f"expected a diffusers pipeline, a (tokenizer, text_encoder) pair, a tokenizer or a text encoder; "
        f"got {type(obj).__name__}"
    )


def tokens_of(tokenizer: Any, word: str) -> list[str]:
    """How the tokenizer splits `word`, for error messages."""
    try:
        return list(tokenizer.tokenize(word))
    except Exception:  # a message helper must not raise
        return []


def _similar_words(tokenizer: Any, word: str, n: int = 3) -> list[str]:
    """Whole-word single tokens of the vocabulary that look like `word`."""
    stems = {
        k[: -len("</w>")] if k.endswith("</w>") else k.lstrip("Ġ▁")
        for k in tokenizer.get_vocab()
    }
    stems = sorted(s for s in stems if len(s) >= 3 and s.isalpha())
    picks = difflib.get_close_matches(str(word).lower(), stems, n=n, cutoff=0.0)
    return [s for s in picks if single_token_id(tokenizer, s) is not None]


def class_word_id(tokenizer: Any, word: str) -> int:
    """The vocabulary id of a class word that is a single token; a ValueError with suggestions otherwise."""
    tid = single_token_id(tokenizer, word)
    if tid is None:
        split = tokens_of(tokenizer, word) if isinstance(word, str) else []
        how = f" (it tokenizes to {len(split)} tokens {split})" if split else ""
        eg = ", ".join(repr(s) for s in _similar_words(tokenizer, str(word)))
        raise ValueError(
            f"unknown class word {word!r}{how}; pick a word that tokenizes to one token"
            + (f", e.g. {eg}" if eg else "")
        )
    return tid


def token_row(pipe_or_tokenizer_and_encoder: Any, word: str) -> int:
    """The row of the input-embedding matrix that `word` (a placeholder or a one-token word) reads."""
    tokenizer, encoder = prompt_parts(pipe_or_tokenizer_and_encoder)
    if tokenizer is None:
        raise ValueError("token_row needs a tokenizer: pass the pipeline or (tokenizer, text_encoder)")
    tid = single_token_id(tokenizer, word)
    if tid is None:
        split = tokens_of(tokenizer, word) if isinstance(word, str) else []
        raise ValueError(
            f"{word!r} is not a single token of the tokenizer (it tokenizes to {split}); if it is a learned "
            f"placeholder, load its embedding first with pipe.load_textual_inversion(path) (or "
            f"pipe.load_textual_inversion(persviz.embeddings.load_learned_embeds(path)))"
        )
    if encoder is not None:
        V = encoder.get_input_embeddings().weight.shape[0]
        if tid >= V:
            raise ValueError(
                f"{word!r} has id {tid} but the text encoder has only {V} embedding rows; resize it with "
                f"text_encoder.resize_token_embeddings(len(tokenizer)) or load the token with pipe.load_textual_inversion"
            )
    return tid


def embedding_matrix(pipe: Pipeline) -> torch.Tensor:
    """The text encoder's input-embedding weights [V, D] (detached; shares memory with the model)."""
    _, encoder = prompt_parts(pipe)
    if encoder is None:
        raise ValueError("embedding_matrix needs a text encoder: pass the pipeline, its text_encoder or a pair")
    return encoder.get_input_embeddings().weight.detach()


def vocab_norms(pipe: Pipeline) -> torch.Tensor:
    """The L2 norm of every row of the input-embedding matrix, float32 [V] on the CPU (Fig. 4's histogram)."""
    W = embedding_matrix(pipe)
    if W.device.type == "meta":
        raise ValueError("the text encoder's weights are on the meta device (sequential offload); load them first")
    return W.float().norm(dim=-1).cpu()


def norm_ratio_and_cosine(v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|v| / |c|, cos(v, c)) over the last dimension, in float64; [..., D] inputs broadcast to [...] outputs.

    Stack V* of several saved steps as v [S, D] to track both over training (TEA Sec. 3.2.3).
    """
    v64 = torch.as_tensor(v).detach().to(torch.float64)
    c64 = torch.as_tensor(c).detach().to(device=v64.device, dtype=torch.float64)
    if v64.ndim == 0 or c64.ndim == 0 or v64.shape[-1] != c64.shape[-1]:
        raise ValueError(f"v and c must be [..., D] with the same D; got {tuple(v64.shape)} and {tuple(c64.shape)}")
    vn, cn = v64.norm(dim=-1), c64.norm(dim=-1)
    if bool((vn == 0).any()) or bool((cn == 0).any()):
        raise ValueError("v or c has zero norm; the ratio and the cosine are undefined")
    return vn / cn, (v64 * c64).sum(-1) / (vn * cn)
