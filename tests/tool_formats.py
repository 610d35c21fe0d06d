"""Writers of other tools' embedding files, written here (not copied) to reproduce each tool's on-disk format exactly,
and the loaders' key checks of tools that cannot run here. Each function names the upstream file it follows.

- AUTOMATIC1111/stable-diffusion-webui modules/textual_inversion/image_embedding.py (commit 011bac41dffaaf4b24d3e1e76
  0d1236ce0fa61ab): ``embedding_to_b64`` (base64 of JSON, tensors as {"TORCHTENSOR": list}), ``insert_image_data_embed``
  (zlib level 9 of the JSON, nibble blocks of height h and depth 3, dot-pattern high nibbles, LCG XOR, black
  separators) and textual_inversion.py (commit 22ecb78b51f7e6f0234cbc0efbde4ee9a2dc466f) ``train_embedding``: the
  image saved as ``image_embeddings/<name>-<steps_done>.png`` with the PNG text chunk ``sd-ti-embedding``;
  ``Embedding.save`` and ``load_from_file`` (the key checks of ``a1111_load``).
- kohya-ss/sd-scripts train_textual_inversion.py (commit 0010c81a3353b6bb51e698ca649442e730817a8f): ``save_weights``
  ({"emb_params": embs} through save_file with the sai model-spec metadata, or torch.save), ``load_weights`` (the key
  checks of ``kohya_load``); library/train_util.py: ``<output_name>-step{:08d}`` and ``<output_name>-{:06d}``.
- rinongal/textual_inversion ldm/modules/embedding_manager.py (commit 4a487501ad4aebec1deea8808d6309fa2a764376),
  ``EmbeddingManager.save``: torch.save({"string_to_token": {str: token id tensor}, "string_to_param":
  nn.ParameterDict}).
"""
from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image, ImageDraw, PngImagePlugin


# ----------------------------------------------------------------------------- Automatic1111


def a1111_data(vec, name, step, checkpoint="e1441589a6", checkpoint_name="v1-5-pruned-emaonly"):
    """The dict A1111's Embedding.save writes (and train_embedding torch.loads back for the image)."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name, "step": step,
            "sd_checkpoint": checkpoint, "sd_checkpoint_name": checkpoint_name}


def a1111_json(data) -> str:
    """json.dumps with A1111's EmbeddingEncoder rule: a tensor becomes {"TORCHTENSOR": tensor.numpy().tolist()}."""
    def default(obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
        raise TypeError(type(obj).__name__)
    return json.dumps(data, default=default)


def lcg(n):
    """image_embedding.py's lcg(): seed <- (1664525 seed + 1013904223) mod 2**32, yielding seed mod 255."""
    seed, out = 0, []
    for _ in range(n):
        seed = (1664525 * seed + 1013904223) % 2**32
        out.append(seed % 255)
    return np.array(out, dtype=np.uint8)


def _xor(block):
    return np.bitwise_xor(block.astype(np.uint8), lcg(block.size).reshape(block.shape) & 0x0F)


def _dots(block, sequence):
    """style_block: grey ellipses (shades from sequence) every 8 px, their high nibble XOR-ed into the block."""
    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            off = 4 if yi % 2 == 0 else 0
            shade = int(sequence[i % len(sequence)])
            i += 1
            draw.ellipse((x + off, y, x + 6 + off, y + 6), fill=(shade, shade, shade))
    return block ^ (np.array(im).astype(np.uint8) & 0xF0)


def a1111_embed_in_pixels(image, data):
    """insert_image_data_embed: the picture with the low-nibble block left and the high-nibble block right of it."""
    d, h = 3, image.size[1]
    packed = np.frombuffer(zlib.compress(a1111_json(data).encode(), level=9), np.uint8).copy()
    size = packed.shape[0] + (h - (packed.shape[0] % h))
    size = size + ((h * d) - (size % (h * d)))
    low = np.resize(packed & 0x0F, size).reshape((h, -1, d))
    high = np.resize(packed >> 4, size).reshape((h, -1, d))
    first = list(data["string_to_param"].values())[0].cpu().detach().numpy().tolist()[0][:1024]
    style = (np.abs(first) / np.max(np.abs(first)) * 255).astype(np.uint8)
    low = _xor(_dots(low, style))
    high = _xor(_dots(high, style[::-1]))
    im_low, im_high = Image.fromarray(low), Image.fromarray(high)
    out = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, h), (0, 0, 0))
    out.paste(im_low, (0, 0))
    out.paste(image, (im_low.size[0] + 1, 0))
    out.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return out


def preview(size=48, seed=0):
    """A stand-in for A1111's captioned preview picture (every channel > 0, as a rendered image has)."""
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(16, 250, (size, size, 3), dtype=np.uint8))


def a1111_image_embedding(path, vec, name, step, text_chunk=True, fmt="PNG"):
    """train_embedding's image: the preview with the embedding in its pixels, saved with the sd-ti-embedding text
    chunk (base64 of the JSON; a PNG text chunk), or without it (text_chunk=False, as a re-saved copy)."""
    data = a1111_data(vec, name, step)
    img = a1111_embed_in_pixels(preview(), data)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if text_chunk:
            info.add_text("sd-ti-embedding", base64.b64encode(a1111_json(data).encode()))
        img.save(path, "PNG", pnginfo=info)
    else:
        img.save(path, fmt, lossless=True)
    return Path(path)


def a1111_load(path):
    """A1111's load_from_file key checks for .pt/.bin/.safetensors (marked: reproduced, A1111 cannot run here):
    'string_to_param' with one entry, else SDXL clip_g + clip_l, else a dict of exactly one tensor [D] or [n, D];
    the name is the file's (the stored 'name' for pictures). Returns (name, rows float32 [n, D])."""
    path = Path(path)
    if path.suffix == ".safetensors":
        data = safetensors.torch.load_file(str(path), device="cpu")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
        assert len(params) == 1, "embedding file has multiple terms in it"
        emb = next(iter(params.values()))
    elif isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        emb = emb.unsqueeze(0) if emb.ndim == 1 else emb
    else:
        raise AssertionError(f"Couldn't identify {path.name} as neither textual inversion embedding nor diffuser concept.")
    return path.stem, emb.detach().float()


# ----------------------------------------------------------------------------- kohya


def kohya_metadata(title, sdxl=False):
    """The sai model-spec keys kohya's get_sai_model_spec writes for a Textual Inversion (title: --output_name)."""
    arch = "stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1"
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/textual-inversion",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": title, "modelspec.resolution": "512x512", "modelspec.date": "2026-01-01T00:00:00"}


def kohya_save(path, embs, title, save_dtype=None):
    """save_weights: {"emb_params": embs} (cast to save_dtype), save_file with metadata for .safetensors, else
    torch.save."""
    path = Path(path)
    v = embs.detach().clone().cpu()
    v = v.to(save_dtype) if save_dtype is not None else v
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({"emb_params": v}, str(path), kohya_metadata(title))
    else:
        torch.save({"emb_params": v}, path)
    return path


def kohya_run(folder, title, steps, rows_of, ext=".safetensors"):
    """A --save_every_n_steps run: <title>-step{k:08d}<ext> per step, then the final <title><ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in steps:
        kohya_save(folder / f"{title}-step{k:08d}{ext}", rows_of(k), title)
    kohya_save(folder / f"{title}{ext}", rows_of(steps[-1]), title)
    return folder


def kohya_load(path):
    """kohya's load_weights key checks (reproduced: sd-scripts cannot run here): safetensors -> load_file; torch ->
    a dict, string_to_param (or its _parameters) if present; the first value must be a tensor; [D] -> [1, D]."""
    path = Path(path)
    if path.suffix == ".safetensors":
        data = safetensors.torch.load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(data, dict), "weight file is not dict"
        if "string_to_param" in data:
            data = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
    emb = next(iter(data.values()))
    assert isinstance(emb, torch.Tensor), "weight file does not contains Tensor"
    return emb.unsqueeze(0) if emb.ndim == 1 else emb


# ----------------------------------------------------------------------------- the original Textual Inversion


def original_ti_save(path, rows, placeholder="*", token_id=265):
    """EmbeddingManager.save: {"string_to_token": {placeholder: tensor(id)}, "string_to_param": ParameterDict}."""
    params = torch.nn.ParameterDict()
    params[placeholder] = torch.nn.Parameter(rows.clone(), requires_grad=True)
    torch.save({"string_to_token": {placeholder: torch.tensor(token_id)}, "string_to_param": params}, path)
    return Path(path)
