"""Embedding files of other tools, recognized from their content (never their suffix), and written back alike.

    f = read_embedding_file("learned_embeds-steps-500.safetensors")   # an EmbeddingFile
    check_fits(f, pipe)                                               # SDXL / width errors before any use
    write_like(f, new_rows, "fixed.safetensors")                      # same layout, dtype, container, metadata

Containers, told apart by their first bytes: safetensors (8-byte little-endian header length, then a JSON ``{``),
torch zip files (``PK``), legacy torch pickles (``0x80``), pictures (PNG, WebP, AVIF, JPEG XL: A1111's image
embeddings, read by ``persviz.image_embeddings`` without pickle). Layouts, told apart by their keys (the conventions
of diffusers' ``loaders/textual_inversion.py``, Automatic1111's ``textual_inversion.py``, kohya's sd-scripts and the
original Textual Inversion's ``embedding_manager.py``); every format names the tool that writes it (``TOOLS``):

=====================  ===================================================================================
format                 content
=====================  ===================================================================================
``diffusers``          {token: [n, D]} (or [D]); per-row names {tok, tok_1, ...} are one multi-vector token.
                       diffusers' ``textual_inversion.py`` writes it as ``learned_embeds.safetensors`` (or
                       ``.bin``), and its snapshots as ``learned_embeds-steps-N.*``.
``custom-diffusion``   {token: [D]} as safetensors bytes, what diffusers' ``train_custom_diffusion.py``
                       (``save_new_embed``) writes to ``<new1>.bin``.
``a1111``              {"string_to_param": {"*": [n, D]}, "string_to_token", "name", "step", ...} (a .pt).
``a1111-image``        the same dict carried by a picture (text chunk ``sd-ti-embedding``, else the pixels).
``kohya``              {"emb_params": [n, D]} (.safetensors with kohya's ``modelspec.*`` metadata, or .pt);
                       the token: ``modelspec.title`` (kohya's output name, by default its --token_string),
                       else the file name without kohya's ``-stepNNNNNNNN`` / ``-NNNNNN`` suffix.
``textual-inversion``  the original Textual Inversion (rinongal/textual_inversion): {"string_to_token",
                       "string_to_param": nn.ParameterDict {"*": [n, D]}}, read with torch.load
                       weights_only=True and an allow-list of exactly ``torch.nn.ParameterDict``.
``sdxl``               {"clip_l": [n, 768], "clip_g": [n, 1280]} (kohya, A1111/Forge, ComfyUI, diffusers' pivotal
                       tuning ``<name>_emb.safetensors``): inspected per encoder against an SDXL model, refused
                       against SD 1.x models.
``diffusers-sdxl``     a folder holding diffusers' ``textual_inversion_sdxl.py`` pair, ``learned_embeds.safetensors``
                       ({token: [n, 768]}, clip_l) and ``learned_embeds_2.safetensors`` ({token: [n, 1280]},
                       clip_g): read as one embedding with the two parts.
``flux``               {"clip_l": [n, 768], "t5": [n, 4096]} (diffusers' pivotal tuning for FLUX.1,
                       ``train_dreambooth_lora_flux_advanced.py``'s ``<name>_emb.safetensors``): inspected and fixed
                       per encoder against a FLUX.1 model.
``flux-comfyui``       ComfyUI's FLUX.1 embedding: {"t5xxl": [n, 4096]} and optionally {"clip_l": [n, 768]} (the keys
                       its CLIP loaders look up); the ``t5xxl`` rows are T5's, written back under the same keys.
=====================  ===================================================================================

Steps: ``metadata["step"]`` is the number a user of the file's tool sees, one convention for ``inspect``, ``adopt``
and the tracker (``trainers.list_snapshots`` names snapshots by the same number):

- diffusers: N of ``learned_embeds-steps-N`` (its ``global_step``: N optimizer steps done).
- A1111 (.pt and pictures): N of ``<name>-N`` (A1111's ``steps_done``, in its file names, UI and preview captions);
  the file stores ``step`` = N - 1 (kept as ``metadata["stored_step"]``). A final ``<name>.pt`` has no N: its stored
  ``step``.
- kohya: N of ``<name>-stepNNNNNNNN`` (its ``global_step``); ``<name>-NNNNNN`` is epoch N (``metadata["epoch"]``,
  no step); the final ``<name>.*`` carries none.
- original Textual Inversion: N of ``embeddings_gs-N.pt`` (PyTorch Lightning's ``global_step`` when saved).
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
from persviz.image_embeddings import ImageEmbeddingError, read_image_embedding, sniff_image
from persviz.io import PathLike, atomic_write_bytes


FORMATS = ("diffusers", "custom-diffusion", "a1111", "a1111-image", "kohya", "textual-inversion", "sdxl",
           "diffusers-sdxl", "flux", "flux-comfyui")
#: the tool that writes each format, as inspect names it
TOOLS = {
    "diffusers": "diffusers (examples/textual_inversion/textual_inversion.py)",
    "custom-diffusion": "diffusers (examples/custom_diffusion/train_custom_diffusion.py)",
    "a1111": "Automatic1111 stable-diffusion-webui (Textual Inversion .pt)",
    "a1111-image": "Automatic1111 stable-diffusion-webui (image embedding)",
    "kohya": "kohya-ss sd-scripts (train_textual_inversion.py)",
    "textual-inversion": "the original Textual Inversion (rinongal/textual_inversion)",
    "sdxl": ("an SDXL embedding (kohya's sdxl_train_textual_inversion.py, A1111/Forge, ComfyUI, diffusers' pivotal "
             "tuning train_dreambooth_lora_sdxl_advanced.py)"),
    "diffusers-sdxl": "diffusers (examples/textual_inversion/textual_inversion_sdxl.py: learned_embeds + learned_embeds_2)",
    "flux": ("a FLUX.1 embedding (diffusers' pivotal tuning "
             "examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py: clip_l + t5)"),
    "flux-comfyui": "a FLUX.1 embedding in ComfyUI's layout (t5xxl, and clip_l)",
}
#: the model family a per-encoder format is trained on (its embeddings' name in sentences) and a model to name;
#: every other format is one encoder's rows (Stable Diffusion 1.x)
FILE_FAMILIES = {"sdxl": ("SDXL", "stabilityai/stable-diffusion-xl-base-1.0"),
                 "diffusers-sdxl": ("SDXL", "stabilityai/stable-diffusion-xl-base-1.0"),
                 "flux": ("FLUX.1", "black-forest-labs/FLUX.1-dev"),
                 "flux-comfyui": ("FLUX.1", "black-forest-labs/FLUX.1-dev")}
#: a format's file keys where they differ from the text encoders' names (ComfyUI stores T5's rows as t5xxl)
PART_KEYS = {"flux-comfyui": {"t5": "t5xxl"}}
#: safetensors metadata of persviz's per-encoder files (clip_l + clip_g): the token (the layout has no key for it;
#: kohya, A1111 and ComfyUI name the token after the file, which stays their token)
TOKEN_METADATA = "persviz:token"
#: the two files of diffusers' textual_inversion_sdxl.py in its output folder: clip_l's rows, clip_g's rows
SDXL_PAIR = {"clip_l": "learned_embeds.safetensors", "clip_g": "learned_embeds_2.safetensors"}
CONTAINERS = ("safetensors", "torch-zip", "torch-pickle", "png", "webp", "avif", "jxl")
IMAGE_CONTAINERS = ("png", "webp", "avif", "jxl")
#: the classes the original Textual Inversion's .pt needs beyond torch.load's weights-only defaults
ORIGINAL_TI_GLOBALS = (torch.nn.ParameterDict,)
FOLDER_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
#: text-encoder widths of the common model families, for error messages
FAMILIES = {768: "SD 1.x (CLIP ViT-L/14)", 1024: "SD 2.x (OpenCLIP ViT-H/14)", 1280: "SDXL's second encoder (OpenCLIP ViT-bigG)"}
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SNAPSHOT = re.compile(r"learned_embeds(?:_2)?-steps-(\d+)")
A1111_STEP = re.compile(r"(.+)-(\d+)")  # A1111's <name>-<steps_done>
KOHYA_STEP = re.compile(r"(.+)-step(\d{8})")  # kohya's train_util.STEP_FILE_NAME "{}-step{:08d}"
KOHYA_EPOCH = re.compile(r"(.+)-(\d{6})")  # kohya's train_util.EPOCH_FILE_NAME "{}-{:06d}"
ORIGINAL_TI_STEP = re.compile(r"embeddings_gs-(\d+)")  # the original Textual Inversion's checkpoints


def an(word: str) -> str:
    """'a' or 'an' before a family's name as it is read aloud ('an SDXL', 'a FLUX.1', 'a Stable Diffusion')."""
    return "an" if word[:1] in "AEIOU" or word.startswith("SD") else "a"


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

    @property
    def per_encoder(self) -> bool:
        """Whether the file holds one part per text encoder (SDXL's clip_l and clip_g), not rows of one encoder."""
        return bool(self.parts)

    @property
    def family(self) -> str:
        """The model family the file's layout belongs to, as sentences name it ('SDXL', 'FLUX.1'; one encoder's rows:
        'Stable Diffusion 1.x')."""
        return FILE_FAMILIES.get(self.format, ("Stable Diffusion 1.x", SD15))[0]

    @property
    def family_model(self) -> str:
        """A Hub model of that family, for sentences that say which model to pass."""
        return FILE_FAMILIES.get(self.format, ("Stable Diffusion 1.x", SD15))[1]

    @property
    def tool(self) -> str:
        """The tool that writes this format (TOOLS)."""
        return TOOLS[self.format]

    @property
    def broken_rows(self) -> list[str]:
        """Names of the rows holding NaN or Inf (a diverged training step): such a token cannot be used or fixed."""
        bad = ~torch.isfinite(self.rows.float()).all(dim=-1)
        return [n for n, b in zip(self.row_names, bad.tolist()) if b]

    def describe(self) -> str:
        """One line: format, container, token, shape, dtype, step."""
        if self.per_encoder:
            shape = ", ".join(f"{k} {list(v.shape)}" for k, v in self.parts.items())
        else:
            shape = f"{self.n_vectors} x {self.width}"
        step = f", step {self.metadata['step']}" if self.metadata.get("step") is not None else ""
        return (f"{self.format} ({self.container}): token {self.token!r}, {shape}, "
                f"{str(self.dtype).replace('torch.', '')}{step}; written by {self.tool}")


# ----------------------------------------------------------------------------- containers


def sniff_container(head: bytes, size: int) -> str | None:
    """One of CONTAINERS from a file's first bytes (>= 16) and its size; None if unknown."""
    image = sniff_image(head)
    if image is not None:
        return image
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
        f"{path} is neither a safetensors, a torch file nor an A1111 image embedding (first bytes {head[:8]!r}); "
        f"pass a Textual Inversion embedding (.safetensors, .bin, .pt or A1111's .png)")


def _load(path: Path) -> tuple[Any, str, dict[str, str]]:
    """(object, container, safetensors metadata) of one file, by its content."""
    if not path.exists():
        raise EmbeddingFileError(f"no file at {path}; check the path")
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return _load(path / name)
        found = embedding_candidates(path)
        what = (f"it holds {len(found)} embedding files ({', '.join(p.name for p in found[:6])}"
                f"{', ...' if len(found) > 6 else ''}): pass one of them, or the folder to `persviz inspect`, which "
                "lists them all") if found else "and no embedding files"
        raise EmbeddingFileError(f"{path} is a folder without {' or '.join(FOLDER_FILES)}; {what}")
    with open(path, "rb") as fh:
        head = fh.read(64)
    container = sniff_container(head, path.stat().st_size)
    if container is None:
        raise _unknown_file(path, head)
    if container in IMAGE_CONTAINERS:
        try:
            data, where = read_image_embedding(path)
        except ImageEmbeddingError as err:
            raise EmbeddingFileError(str(err)) from None
        return data, container, {"embedded in": where}
    if container == "safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, container, meta
        except Exception as err:  # safetensors raises its own error classes
            raise EmbeddingFileError(f"{path} looks like safetensors but cannot be read ({err}); the file may be "
                                     f"truncated, download or copy it again") from None
    try:
        with open(path, "rb") as fh, torch.serialization.safe_globals(list(ORIGINAL_TI_GLOBALS)):
            # a file object: torch.load would pick its reader by the suffix; the allow-list is the original Textual
            # Inversion's nn.ParameterDict, nothing else beyond weights_only's tensors and containers
            return torch.load(fh, map_location="cpu", weights_only=True), container, {}
    except Exception as err:  # pickle errors come in many classes
        raise EmbeddingFileError(
            f"{path} is a torch file that does not load with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); open it yourself in a trusted session and save "
            f"{{token: tensor}} as .safetensors") from None


def embedding_candidates(folder: Path) -> list[Path]:
    """The files of a folder whose first bytes are an embedding container (safetensors, torch, picture), sorted;
    A1111's optimizer states (``*.optim``) and preview pictures (``*.preview.*``) left out as A1111 does."""
    out = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix == ".optim" or p.stem.endswith(".preview"):
            continue
        with open(p, "rb") as fh:
            head = fh.read(64)
        if sniff_container(head, p.stat().st_size) is not None:
            out.append(p)
    return out


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
            widths = sorted({int(v.shape[-1]) for v in vs})
            if len(widths) > 1:
                raise EmbeddingFileError(
                    f"{path} holds rows of mixed widths {widths} under {names[0]!r}, {names[1]!r}, ...: the rows of "
                    f"one token must share the text encoder's width, so re-save them from one model")
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


def _string_to_param(obj: Mapping[str, Any], p: Path, container: str) -> tuple[str, str, torch.Tensor]:
    """(format, token, rows) of a {"string_to_param": ...} file: A1111's (with its "name") or the original TI's."""
    params = obj["string_to_param"]
    params = getattr(params, "_parameters", params)  # nn.ParameterDict (the original TI; A1111 files of torch 1.11)
    a1111 = "name" in obj or container in IMAGE_CONTAINERS
    who = "an A1111" if a1111 else "a Textual Inversion"
    if not isinstance(params, Mapping) or len(params) != 1:
        inner = _keys(params) if isinstance(params, Mapping) else type(params).__name__
        raise EmbeddingFileError(f"{p}: {who} embedding needs string_to_param with one placeholder {{'*': [n, D]}}; "
                                 f"found {inner}; save each placeholder to its own file")
    ((key, value),) = params.items()
    rows = _tensor(value, f"string_to_param[{key!r}]", p)
    if not a1111:
        return "textual-inversion", str(key), rows
    name = obj.get("name")
    fmt = "a1111-image" if container in IMAGE_CONTAINERS else "a1111"
    return fmt, str(name) if isinstance(name, str) and name else p.stem, rows


def tool_step(fmt: str, path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """{"step": N} in the tool's own convention (module docstring), plus A1111's stored step or kohya's epoch."""
    stem = path.stem
    if fmt in ("diffusers", "custom-diffusion") and (m := SNAPSHOT.fullmatch(stem)):
        return {"step": int(m.group(1))}
    if fmt in ("a1111", "a1111-image"):
        stored = meta.get("step")
        stored = stored if isinstance(stored, int) and not isinstance(stored, bool) else None
        out: dict[str, Any] = {"stored_step": stored}
        for label in (meta.get("name"), stem):
            m = A1111_STEP.fullmatch(str(label or ""))
            if m and stored is not None and int(m.group(2)) == stored + 1:
                return out | {"step": int(m.group(2))}
        return out | {"step": stored}
    if fmt == "kohya":
        if m := KOHYA_STEP.fullmatch(stem):
            return {"step": int(m.group(2))}
        if m := KOHYA_EPOCH.fullmatch(stem):
            return {"epoch": int(m.group(2))}
    if fmt == "textual-inversion" and (m := ORIGINAL_TI_STEP.fullmatch(stem)):
        return {"step": int(m.group(1))}
    return {}


def read_embedding_file(path: PathLike, token: str | None = None) -> EmbeddingFile:
    """Read any Textual Inversion / Custom Diffusion token file (see the module docstring) as an EmbeddingFile.

    Args:
        path: the file, or a folder holding learned_embeds.safetensors / learned_embeds.bin.
        token: replaces the stored token name (A1111 files are named after their file, as A1111 does).
    Raises EmbeddingFileError (a ValueError) with the problem and the fix.
    """
    p = Path(path).expanduser()
    if p.is_dir() and all((p / n).is_file() for n in SDXL_PAIR.values()):
        return _read_pair(p, token)
    obj, container, st_meta = _load(p)
    if p.is_dir():
        p = next(p / n for n in FOLDER_FILES if (p / n).is_file())
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty dict" if isinstance(obj, Mapping) else f"a bare {type(obj).__name__}"
        raise EmbeddingFileError(f"{p} holds {what}, not {{token: tensor}}; it is not a Textual Inversion embedding")
    if container in IMAGE_CONTAINERS:
        meta: dict[str, Any] = dict(st_meta)
    else:
        meta = {f"safetensors:{k}": v for k, v in st_meta.items()}
    parts: dict[str, torch.Tensor] = {}
    if "string_to_param" in obj:
        fmt, tok, rows = _string_to_param(obj, p, container)
        meta.update({k: _plain(obj[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name") if k in obj})
    elif "emb_params" in obj:
        fmt, rows = "kohya", _tensor(obj["emb_params"], "emb_params", p)
        title = st_meta.get("modelspec.title")
        stem = KOHYA_STEP.fullmatch(p.stem) or KOHYA_EPOCH.fullmatch(p.stem)
        tok = title if title else (stem.group(1) if stem else p.stem)
    elif {"clip_l", "clip_g"} <= set(obj):
        parts = {k: _tensor(obj[k], k, p).reshape(-1, obj[k].shape[-1]) for k in ("clip_l", "clip_g")}
        fmt, rows, tok = "sdxl", parts["clip_l"], st_meta.get(TOKEN_METADATA) or p.stem  # persviz's own: its token
    elif {"clip_l", "t5"} <= set(obj) or "t5xxl" in obj:
        fmt = "flux" if "t5xxl" not in obj else "flux-comfyui"
        keys = {"clip_l": "clip_l", **PART_KEYS.get(fmt, {"t5": "t5"})}
        parts = {name: _tensor(obj[k], k, p).reshape(-1, obj[k].shape[-1]) for name, k in keys.items() if k in obj}
        fmt, rows, tok = fmt, parts["t5"], st_meta.get(TOKEN_METADATA) or p.stem
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        tok, rows, _ = _diffusers_rows(obj, p)
        one_vector = len(obj) == 1 and next(iter(obj.values())).ndim == 1
        fmt = "custom-diffusion" if container == "safetensors" and one_vector else "diffusers"
    else:
        raise EmbeddingFileError(
            f"{p} has an unknown layout (keys {_keys(obj)}); expected diffusers' {{token: [n, D]}}, A1111's "
            f"'string_to_param' (.pt) or 'emb_params' (.safetensors), or SDXL's 'clip_l' + 'clip_g'")
    rows = rows.reshape(-1, rows.shape[-1])
    meta.update(tool_step(fmt, p, meta))
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise EmbeddingFileError(f"token must be a non-empty string; got {token!r}")
        tok = token
    return EmbeddingFile(p, fmt, container, tok, rows, rows.dtype, meta, parts, obj)


def _read_pair(folder: Path, token: str | None) -> EmbeddingFile:
    """diffusers' textual_inversion_sdxl.py pair of a folder as one EmbeddingFile with parts clip_l and clip_g."""
    l, g = (read_embedding_file(folder / n, token) for n in SDXL_PAIR.values())
    if l.token != g.token or l.n_vectors != g.n_vectors:
        raise EmbeddingFileError(
            f"{folder}: {SDXL_PAIR['clip_l']} holds {l.token!r} ({l.n_vectors} rows) and {SDXL_PAIR['clip_g']} holds "
            f"{g.token!r} ({g.n_vectors} rows); the two files of one SDXL embedding name one token with as many rows "
            "in each, so pass the folder of one training run")
    return EmbeddingFile(l.path, "diffusers-sdxl", l.container, l.token, l.rows, l.dtype, dict(l.metadata),
                         {"clip_l": l.rows, "clip_g": g.rows}, {"clip_l": l, "clip_g": g})


def read_embedding_folder(folder: PathLike) -> list[tuple[Path, EmbeddingFile | EmbeddingFileError]]:
    """Every embedding file of a folder (embedding_candidates) read, or the sentence saying why it cannot be."""
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise EmbeddingFileError(f"{d} is not a folder; pass a folder of embeddings or one file")
    out: list[tuple[Path, EmbeddingFile | EmbeddingFileError]] = []
    for p in embedding_candidates(d):
        try:
            out.append((p, read_embedding_file(p)))
        except EmbeddingFileError as err:
            out.append((p, err))
    if not out:
        raise EmbeddingFileError(f"{d} holds no embedding files (.safetensors, .bin, .pt or A1111's .png); pass the "
                                 "folder that holds them")
    return out


# ----------------------------------------------------------------------------- against a model


def check_fits(f: EmbeddingFile, text_encoder_or_width: Any) -> None:
    """EmbeddingFileError unless the file's rows fit the (SD 1.x style) text encoder: SDXL files, other widths."""
    width = text_encoder_or_width
    if not isinstance(width, int):
        enc = getattr(width, "text_encoder", width)
        width = int(enc.get_input_embeddings().weight.shape[-1])
    if f.per_encoder:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in f.parts.items())
        raise EmbeddingFileError(
            f"{f.path.name} is {an(f.family)} {f.family} embedding ({shapes}) and the model has one {width}-wide text "
            f"encoder (an SD 1.x-style pipeline); inspect it against {an(f.family)} {f.family} model (--model "
            f"{f.family_model}), or use an embedding "
            f"trained on SD 1.x (persviz trains and fixes SD 1.x embeddings only so far)")
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
        inner = dict(getattr(raw["string_to_param"], "_parameters", raw["string_to_param"]))
        inner["*"] = rows.reshape(inner["*"].shape).clone()
        out["string_to_param"] = inner
        return out
    if f.format == "textual-inversion":  # an nn.ParameterDict again, as embedding_manager.py saves it
        out = dict(raw)
        ((key, old),) = getattr(raw["string_to_param"], "_parameters", raw["string_to_param"]).items()
        out["string_to_param"] = torch.nn.ParameterDict(
            {key: torch.nn.Parameter(rows.reshape(old.shape).clone(), requires_grad=old.requires_grad)})
        return out
    if f.format == "kohya":
        return dict(raw) | {"emb_params": rows.reshape(raw["emb_params"].shape).clone()}
    _, _, names = _diffusers_rows(raw, f.path)
    out = dict(raw)
    for k, row in zip(names, rows if len(names) > 1 else [rows]):
        out[k] = row.reshape(raw[k].shape).clone()
    return out


def _check_parts(f: EmbeddingFile, parts: Any) -> dict[str, torch.Tensor]:
    """{encoder: rows} of a per-encoder file's new rows, each of its part's shape, on the CPU."""
    if not isinstance(parts, Mapping) or sorted(parts) != sorted(f.parts):
        got = sorted(parts) if isinstance(parts, Mapping) else type(parts).__name__
        raise EmbeddingFileError(f"{f.path.name} has the parts {sorted(f.parts)}; pass new rows for each ({got})")
    out = {}
    for k, old in f.parts.items():
        new = torch.as_tensor(parts[k]).detach().cpu()
        if tuple(new.shape) != tuple(old.shape):
            raise EmbeddingFileError(f"the {k} rows must have the file's shape {tuple(old.shape)}; got {tuple(new.shape)}")
        out[k] = new
    return out


def _write_container(f: EmbeddingFile, obj: Mapping[str, Any], out: PathLike) -> Path:
    buf = io.BytesIO()
    if f.container == "safetensors":
        meta = {k[len("safetensors:"):]: v for k, v in f.metadata.items() if k.startswith("safetensors:")}
        data = safetensors_bytes({k: v.contiguous() for k, v in obj.items()}, metadata=meta or None)
    else:
        torch.save(obj, buf, _use_new_zipfile_serialization=f.container == "torch-zip")
        data = buf.getvalue()
    return atomic_write_bytes(Path(out).expanduser(), data)


def write_parts_like(f: EmbeddingFile, parts: Mapping[str, torch.Tensor], out: PathLike) -> Path:
    """Write new rows per encoder ({"clip_l": [n, 768], "clip_g": [n, 1280]}) for a per-encoder file: the ``sdxl``
    layout as f (keys, shapes, each part's dtype, container, metadata, other entries kept); diffusers'
    ``textual_inversion_sdxl.py`` pair as one ``{"clip_l", "clip_g"}`` .safetensors (float32, the layout kohya,
    A1111/Forge, ComfyUI and diffusers' pivotal tuning load; the token in the metadata). Atomic; returns the path."""
    new = _check_parts(f, parts)
    if f.format != "diffusers-sdxl":  # one file of a part per encoder (SDXL clip_l + clip_g, FLUX.1 clip_l + t5)
        obj = dict(f.raw)
        keys = PART_KEYS.get(f.format, {})
        for k, v in new.items():
            key = keys.get(k, k)
            obj[key] = v.to(f.parts[k].dtype).reshape(f.raw[key].shape).contiguous().clone()
        return _write_container(f, obj, out)
    o = Path(out).expanduser()
    if o.suffix != ".safetensors":
        raise EmbeddingFileError(f"{o.name}: diffusers' SDXL pair is written as one clip_l + clip_g .safetensors; "
                                 f"pass --out NAME.safetensors (A1111 and ComfyUI name the token after the file)")
    meta = {"format": "pt", TOKEN_METADATA: f.token, "persviz:source": f"{f.path.parent.name} ({f.format})"}
    return atomic_write_bytes(o, safetensors_bytes({k: v.float().contiguous() for k, v in new.items()},
                                                   metadata=meta))


def write_like(f: EmbeddingFile, rows: torch.Tensor, out: PathLike) -> Path:
    """Write `rows` [n, D] as a new file in f's format, container, dtype and metadata (atomically); returns the path.

    The output reads back with the same tools as f (diffusers' load_textual_inversion, A1111, kohya)."""
    if f.per_encoder:
        raise EmbeddingFileError(f"{f.path.name} is an SDXL embedding, a part per text encoder; write its rows with "
                                 "write_parts_like")
    if f.format == "a1111-image":
        raise EmbeddingFileError(f"{f.path.name} is an A1111 image embedding; write its rows with write_portable, a "
                                 ".safetensors that A1111, kohya and diffusers load")
    rows = torch.as_tensor(rows).detach().cpu()
    if tuple(rows.shape) != tuple(f.rows.shape):
        raise EmbeddingFileError(f"rows must have the file's shape {tuple(f.rows.shape)}; got {tuple(rows.shape)}")
    obj = _rebuild(f, rows.to(f.dtype).contiguous())
    return _write_container(f, obj, out)


def write_portable(f: EmbeddingFile, rows: torch.Tensor, out: PathLike) -> Path:
    """Write `rows` [n, D] as {token: rows} float32 .safetensors (atomically), the layout A1111 (one tensor, named
    after the file), kohya (its first tensor) and diffusers' load_textual_inversion (token: the key) all load."""
    o = Path(out).expanduser()
    if o.suffix != ".safetensors":
        raise EmbeddingFileError(f"{o.name}: the portable file is a .safetensors; pass --out NAME.safetensors (A1111 "
                                 f"names the token after the file, e.g. {f.token}.safetensors)")
    rows = torch.as_tensor(rows).detach().cpu().float().contiguous()
    if tuple(rows.shape) != tuple(f.rows.shape):
        raise EmbeddingFileError(f"rows must have the file's shape {tuple(f.rows.shape)}; got {tuple(rows.shape)}")
    meta = {"format": "pt", "persviz:source": f"{f.path.name} ({f.format})"}
    if f.metadata.get("step") is not None:
        meta["persviz:step"] = str(f.metadata["step"])
    return atomic_write_bytes(o, safetensors_bytes({f.token: rows}, metadata=meta))


def summary(f: EmbeddingFile) -> dict[str, Any]:
    """The file's description as a JSON-ready dict."""
    return {"path": str(f.path), "format": f.format, "tool": f.tool, "container": f.container, "token": f.token,
            "rows": f.n_vectors, "width": f.width, "dtype": str(f.dtype).replace("torch.", ""),
            "metadata": json.loads(json.dumps(dict(f.metadata), default=str)),
            "parts": {k: list(v.shape) for k, v in f.parts.items()}}


__all__ = ["CONTAINERS", "FILE_FAMILIES", "FORMATS", "PART_KEYS", "SDXL_PAIR", "an", "TOKEN_METADATA", "TOOLS", "EmbeddingFile", "EmbeddingFileError",
           "check_fits", "embedding_candidates", "read_embedding_file", "read_embedding_folder", "sniff_container", "summary",
           "tool_step", "write_like", "write_parts_like", "write_portable"]
