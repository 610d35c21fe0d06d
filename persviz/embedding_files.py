"""Embedding files of other tools, recognized from their content (never their suffix), and written back alike.

    f = read_embedding_file("learned_embeds-steps-500.safetensors")   # an EmbeddingFile
    check_fits(f, pipe)                                               # SDXL / width errors before any use
    write_like(f, new_rows, "fixed.safetensors")                      # same layout, dtype, container, metadata

Containers, told apart by their first bytes: safetensors (8-byte little-endian header length, then a JSON ``{``),
torch zip files (``PK``), legacy torch pickles (``0x80``). Layouts, told apart by their keys (the conventions of
diffusers' ``loaders/textual_inversion.py``, Automatic1111's ``textual_inversion.py`` and kohya's sd-scripts):

=====================  ===================================================================================
format                 content
=====================  ===================================================================================
``diffusers``          {token: [n, D]} (or [D]); per-row names {tok, tok_1, ...} are one multi-vector token.
                       diffusers' ``textual_inversion.py`` writes it as ``learned_embeds.safetensors`` (or
                       ``.bin``), and its snapshots as ``learned_embeds-steps-N.*``: ``step`` = N.
``custom-diffusion``   {token: [D]} as safetensors bytes, what diffusers' ``train_custom_diffusion.py``
                       (``save_new_embed``) writes to ``<new1>.bin``.
``a1111``              {"string_to_param": {"*": [n, D]}, "string_to_token", "name", "step", ...} (a .pt).
``a1111-safetensors``  {"emb_params": [n, D]} (A1111 / kohya); the token is the file name.
``sdxl``               {"clip_l": [n, 768], "clip_g": [n, 1280]}: described, refused against SD 1.x models.
=====================  ===================================================================================
"""
from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from persviz.errors import PersvizError
from persviz.io import PathLike, atomic_write_bytes


FORMATS = ("diffusers", "custom-diffusion", "a1111", "a1111-safetensors", "sdxl")
CONTAINERS = ("safetensors", "torch-zip", "torch-pickle")
FOLDER_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
#: text-encoder widths of the common model families, for error messages
FAMILIES = {768: "SD 1.x (CLIP ViT-L/14)", 1024: "SD 2.x (OpenCLIP ViT-H/14)", 1280: "SDXL's second encoder (OpenCLIP ViT-bigG)"}
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SNAPSHOT = re.compile(r"learned_embeds(?:_2)?-steps-(\d+)")


class EmbeddingFileError(PersvizError, ValueError):
    """An embedding file that cannot be read, or does not fit the model; the message names the problem and the fix."""


@dataclass(frozen=True)
class EmbeddingFile:
    """One learned token read from a file: what it is, its rows, and what is needed to write it back alike."""

    path: Path
    format: str  # one of FORMATS
    container: str  # one of CONTAINERS
    token: str  # the placeholder; its extra rows are token_1, token_2, ... in diffusers' convention
    rows: torch.Tensor  # [n, D] in the stored dtype (SDXL: the clip_l part)
    dtype: torch.dtype
    metadata: Mapping[str, Any] = field(default_factory=dict)  # step, name, safetensors metadata, ...
    parts: Mapping[str, torch.Tensor] = field(default_factory=dict)  # SDXL: {"clip_l": [n, 768], "clip_g": ...}
    raw: Any = field(default=None, repr=False)  # the loaded object, for write_like

    @property
    def n_vectors(self) -> int:
        return int(self.rows.shape[0])

    @property
    def width(self) -> int:
        return int(self.rows.shape[-1])

    @property
    def row_names(self) -> list[str]:
        """diffusers' names of the rows once loaded: token, token_1, ..."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.n_vectors)]

    def describe(self) -> str:
        """One line: format, container, token, shape, dtype, step."""
        if self.format == "sdxl":
            shape = ", ".join(f"{k} {list(v.shape)}" for k, v in self.parts.items())
        else:
            shape = f"{self.n_vectors} x {self.width}"
        step = f", step {self.metadata['step']}" if self.metadata.get("step") is not None else ""
        return f"{self.format} ({self.container}): token {self.token!r}, {shape}, {str(self.dtype).replace('torch.', '')}{step}"


# ----------------------------------------------------------------------------- containers


def sniff_container(head: bytes, size: int) -> str | None:
    """'safetensors', 'torch-zip', 'torch-pickle' from a file's first bytes (>= 9) and its size; None if unknown."""
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-pickle"
    return None


def _unknown_file(path: Path, head: bytes) -> EmbeddingFileError:
    if head.startswith(b"version https://git-lfs"):
        return EmbeddingFileError(f"{path} is a Git LFS pointer, not the file itself; run `git lfs pull` and retry")
    return EmbeddingFileError(
        f"{path} is neither a safetensors nor a torch file (first bytes {head[:8]!r}); pass a Textual Inversion "
        f"embedding (.safetensors, .bin or .pt)")


def _load(path: Path) -> tuple[Any, str, dict[str, str]]:
    """(object, container, safetensors metadata) of one file, by its content."""
    if not path.exists():
        raise EmbeddingFileError(f"no file at {path}; check the path")
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return _load(path / name)
        raise EmbeddingFileError(f"{path} is a folder without {' or '.join(FOLDER_FILES)}; pass the file itself")
    with open(path, "rb") as fh:
        head = fh.read(64)
    container = sniff_container(head, path.stat().st_size)
    if container is None:
        raise _unknown_file(path, head)
    if container == "safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, container, meta
        except Exception as err:  # safetensors raises its own error classes
            raise EmbeddingFileError(f"{path} looks like safetensors but cannot be read ({err}); the file may be "
                                     f"truncated, download or copy it again") from None
    try:
        with open(path, "rb") as fh:  # a file object: torch.load would pick its reader by the suffix
            return torch.load(fh, map_location="cpu", weights_only=True), container, {}
    except Exception as err:  # pickle errors come in many classes
        raise EmbeddingFileError(
            f"{path} is a torch file that does not load with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); open it yourself in a trusted session and save "
            f"{{token: tensor}} as .safetensors") from None


# ----------------------------------------------------------------------------- layouts


def _tensor(x: Any, where: str, path: Path) -> torch.Tensor:
    if isinstance(x, torch.nn.Parameter):
        x = x.detach()
    if not isinstance(x, torch.Tensor) or x.ndim not in (1, 2) or x.numel() == 0 or not x.is_floating_point():
        what = f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise EmbeddingFileError(f"{path}: {where} must be a floating-point tensor [D] or [n, D]; found {what}")
    return x.detach().cpu()


def _keys(d: Mapping[str, Any]) -> str:
    keys = sorted(map(str, d))
    return repr(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def _diffusers_rows(sd: Mapping[str, Any], path: Path) -> tuple[str, torch.Tensor, list[str]]:
    """(token, rows [n, D], the keys in row order) of {tok: [n, D]} or {tok: v0, tok_1: v1, ...}."""
    if len(sd) == 1:
        ((tok, v),) = sd.items()
        v = _tensor(v, f"embedding {tok!r}", path)
        return str(tok), v.reshape(-1, v.shape[-1]), [tok]
    roots = [k for k in sd if not re.fullmatch(r".+_\d+", str(k))]
    if len(roots) == 1:
        names = [roots[0]] + [f"{roots[0]}_{i}" for i in range(1, len(sd))]
        if set(names) == set(sd):
            vs = [_tensor(sd[k], f"embedding {k!r}", path) for k in names]
            if all(v.numel() == v.shape[-1] for v in vs):
                return str(roots[0]), torch.stack([v.reshape(-1) for v in vs]), names
    raise EmbeddingFileError(
        f"{path} holds {len(sd)} tokens {_keys(sd)}; a Textual Inversion file holds one token (diffusers' "
        f"load_textual_inversion refuses more), so save each token to its own file")


def _plain(x: Any) -> Any:
    """Metadata values as plain Python (tensors of one number as numbers)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)[:80]


def read_embedding_file(path: PathLike, token: str | None = None) -> EmbeddingFile:
    """Read any Textual Inversion / Custom Diffusion token file (see the module docstring) as an EmbeddingFile.

    Args:
        path: the file, or a folder holding learned_embeds.safetensors / learned_embeds.bin.
        token: replaces the stored token name (A1111 files are named after their file, as A1111 does).
    Raises EmbeddingFileError (a ValueError) with the problem and the fix.
    """
    p = Path(path).expanduser()
    obj, container, st_meta = _load(p)
    if p.is_dir():
        p = next(p / n for n in FOLDER_FILES if (p / n).is_file())
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty dict" if isinstance(obj, Mapping) else f"a bare {type(obj).__name__}"
        raise EmbeddingFileError(f"{p} holds {what}, not {{token: tensor}}; it is not a Textual Inversion embedding")
    meta: dict[str, Any] = {f"safetensors:{k}": v for k, v in st_meta.items()}
    snap = SNAPSHOT.fullmatch(p.stem)
    if snap:
        meta["step"] = int(snap.group(1))
    parts: dict[str, torch.Tensor] = {}
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            inner = _keys(params) if isinstance(params, Mapping) else type(params).__name__
            raise EmbeddingFileError(f"{p}: an A1111 embedding needs string_to_param = {{'*': [n, D]}}; found {inner}")
        fmt, rows = "a1111", _tensor(params["*"], "string_to_param['*']", p)
        name = obj.get("name")
        tok = str(name) if isinstance(name, str) and name else p.stem
        meta.update({k: _plain(obj[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name") if k in obj})
    elif "emb_params" in obj:
        fmt, rows, tok = "a1111-safetensors", _tensor(obj["emb_params"], "emb_params", p), p.stem
    elif {"clip_l", "clip_g"} <= set(obj):
        parts = {k: _tensor(obj[k], k, p).reshape(-1, obj[k].shape[-1]) for k in ("clip_l", "clip_g")}
        fmt, rows, tok = "sdxl", parts["clip_l"], p.stem
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        tok, rows, _ = _diffusers_rows(obj, p)
        one_vector = len(obj) == 1 and next(iter(obj.values())).ndim == 1
        fmt = "custom-diffusion" if container == "safetensors" and one_vector else "diffusers"
    else:
        raise EmbeddingFileError(
            f"{p} has an unknown layout (keys {_keys(obj)}); expected diffusers' {{token: [n, D]}}, A1111's "
            f"'string_to_param' (.pt) or 'emb_params' (.safetensors), or SDXL's 'clip_l' + 'clip_g'")
    rows = rows.reshape(-1, rows.shape[-1])
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise EmbeddingFileError(f"token must be a non-empty string; got {token!r}")
        tok = token
    return EmbeddingFile(p, fmt, container, tok, rows, rows.dtype, meta, parts, obj)


# ----------------------------------------------------------------------------- against a model


def check_fits(f: EmbeddingFile, text_encoder_or_width: Any) -> None:
    """EmbeddingFileError unless the file's rows fit the (SD 1.x style) text encoder: SDXL files, other widths."""
    width = text_encoder_or_width
    if not isinstance(width, int):
        enc = getattr(width, "text_encoder", width)
        width = int(enc.get_input_embeddings().weight.shape[-1])
    if f.format == "sdxl":
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in f.parts.items())
        raise EmbeddingFileError(
            f"{f.path.name} is an SDXL embedding ({shapes}) and the model has one {width}-wide text encoder; "
            f"persviz supports SD 1.x-style pipelines (one CLIP text encoder), so use an embedding trained on SD 1.x")
    if f.width != width:
        known = FAMILIES.get(f.width)
        hint = f" (width {f.width} is {known})" if known else ""
        model = f" e.g. --model {SD15}" if f.width == 768 else ""
        raise EmbeddingFileError(
            f"{f.path.name} holds rows of width {f.width} but the model's text encoder is {width} wide: the "
            f"embedding was trained on another model{hint}; pass the model it was trained on{model}")


# ----------------------------------------------------------------------------- writing back


def _rebuild(f: EmbeddingFile, rows: torch.Tensor) -> Any:
    """f.raw with its rows replaced by `rows` [n, D], keeping keys, shapes and every other entry."""
    raw = f.raw
    if f.format == "a1111":
        out = dict(raw)
        inner = dict(raw["string_to_param"])
        inner["*"] = rows.reshape(inner["*"].shape).clone()
        out["string_to_param"] = inner
        return out
    if f.format == "a1111-safetensors":
        return dict(raw) | {"emb_params": rows.reshape(raw["emb_params"].shape).clone()}
    _, _, names = _diffusers_rows(raw, f.path)
    out = dict(raw)
    for k, row in zip(names, rows if len(names) > 1 else [rows]):
        out[k] = row.reshape(raw[k].shape).clone()
    return out


def write_like(f: EmbeddingFile, rows: torch.Tensor, out: PathLike) -> Path:
    """Write `rows` [n, D] as a new file in f's format, container, dtype and metadata (atomically); returns the path.

    The output reads back with the same tools as f (diffusers' load_textual_inversion, A1111, kohya)."""
    if f.format == "sdxl":
        raise EmbeddingFileError("SDXL embeddings are read for description only; they cannot be rewritten here")
    rows = torch.as_tensor(rows).detach().cpu()
    if tuple(rows.shape) != tuple(f.rows.shape):
        raise EmbeddingFileError(f"rows must have the file's shape {tuple(f.rows.shape)}; got {tuple(rows.shape)}")
    obj = _rebuild(f, rows.to(f.dtype).contiguous())
    buf = io.BytesIO()
    if f.container == "safetensors":
        meta = {k[len("safetensors:"):]: v for k, v in f.metadata.items() if k.startswith("safetensors:")}
        data = safetensors_bytes({k: v.contiguous() for k, v in obj.items()}, metadata=meta or None)
    else:
        torch.save(obj, buf, _use_new_zipfile_serialization=f.container == "torch-zip")
        data = buf.getvalue()
    return atomic_write_bytes(Path(out).expanduser(), data)


def summary(f: EmbeddingFile) -> dict[str, Any]:
    """The file's description as a JSON-ready dict."""
    return {"path": str(f.path), "format": f.format, "container": f.container, "token": f.token,
            "rows": f.n_vectors, "width": f.width, "dtype": str(f.dtype).replace("torch.", ""),
            "metadata": json.loads(json.dumps(dict(f.metadata), default=str)),
            "parts": {k: list(v.shape) for k, v in f.parts.items()}}


__all__ = ["CONTAINERS", "FORMATS", "EmbeddingFile", "EmbeddingFileError", "check_fits", "read_embedding_file",
           "sniff_container", "summary", "write_like"]
