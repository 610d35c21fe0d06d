"""Automatic1111's image embeddings read without pickle: an embedding carried by a picture (``.png``, ``.webp``,
``.avif``; ``.jxl`` with a Pillow plugin), as A1111's ``modules/textual_inversion/image_embedding.py`` stores it.

    data, where = read_image_embedding("candy-20.png")   # {"string_to_param": {"*": tensor}, "name", "step", ...}

Two carriers, read in A1111's order:

- the PNG text chunk ``sd-ti-embedding``: base64 of JSON, tensors written as ``{"TORCHTENSOR": nested list}``;
- else the pixels: the zlib-compressed JSON split into its low and high nibbles, each laid out as an [h, w, 3] block
  (the data repeated to fill it), its low nibble XOR-ed with the low nibble of a pseudo-random byte stream (the
  linear congruential generator a = 1664525, c = 1013904223, m = 2**32, seed 0, each value taken modulo 255), its
  high nibble a decorative dot pattern; the low-nibble block sits left of the picture, the high-nibble block right
  of it, each behind one black column. Reading: crop the black border, keep each pixel's low nibble, find the black
  columns, XOR both blocks with the same stream, join the nibbles and inflate.

JSON is decoded with ``json`` only; the numbers become float32 tensors (A1111 itself loads them as float32).
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from persviz.errors import PersvizError
from persviz.images import MAX_PIXELS

TEXT_CHUNK = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
LCG = (1664525, 1013904223, 2**32)  # (a, c, m) of image_embedding.py's lcg(), seed 0, values mod 255
#: first bytes of the picture formats A1111 reads embeddings from (its load_from_file: .png .webp .jxl .avif)
SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "jxl": (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")}


class ImageEmbeddingError(PersvizError, ValueError):
    """A picture that carries no readable A1111 embedding; the message names the problem and the fix."""


def sniff_image(head: bytes) -> str | None:
    """'png', 'webp', 'avif' or 'jxl' from a file's first bytes (>= 12), else None."""
    for kind, sigs in SIGNATURES.items():
        if any(head.startswith(s) for s in sigs):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    return None


def lcg_bytes(n: int) -> np.ndarray:
    """The first n values of image_embedding.py's lcg() (uint8): seed_{k+1} = (a seed_k + c) mod 2**32, value mod 255."""
    a, c, m = LCG
    out = np.empty(n, dtype=np.uint8)
    seed = 0
    for i in range(n):
        seed = (a * seed + c) % m
        out[i] = seed % 255
    return out


def _tensors(d: dict) -> Any:
    """json object_hook: {"TORCHTENSOR": list} -> a float32 tensor."""
    if TENSOR_KEY in d:
        return torch.tensor(np.asarray(d[TENSOR_KEY], dtype=np.float64), dtype=torch.float32)
    return d


def decode_json(raw: bytes | str, where: str) -> dict:
    """The embedding dict of A1111's JSON (tensors as {"TORCHTENSOR": list}), never through pickle."""
    try:
        data = json.loads(raw, object_hook=_tensors)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ImageEmbeddingError(f"{where} holds no valid embedding JSON ({err}); the picture is damaged, take it "
                                  "again from where it was saved") from None
    if not isinstance(data, dict):
        raise ImageEmbeddingError(f"{where} holds JSON {type(data).__name__}, not an embedding dict")
    return data


def decode_text_chunk(text: str | bytes, where: str) -> dict:
    """The embedding of a ``sd-ti-embedding`` text chunk (base64 of JSON)."""
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as err:
        raise ImageEmbeddingError(f"{where}: its {TEXT_CHUNK} text chunk is not base64 ({err}); the picture is "
                                  "damaged, take it again from where it was saved") from None
    return decode_json(raw, f"{where} ({TEXT_CHUNK} text chunk)")


def _crop_black(img: np.ndarray) -> np.ndarray:
    """img [h, w, 3] without its outer rows and columns holding no pixel whose three channels are all > 0."""
    mask = (img > 0).all(axis=2)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return img[:0, :0]
    return img[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


def decode_pixels(pixels: np.ndarray) -> dict | None:
    """The embedding laid in the pixels [h, w, 3] uint8 (module docstring), or None if they hold none."""
    nib = _crop_black(np.asarray(pixels, dtype=np.uint8)) & 0x0F
    black = np.flatnonzero(nib.sum(axis=(0, 2), dtype=np.int64) == 0)
    if black.size < 2:
        return None
    low, high = nib[:, : black.min(), :], nib[:, black.max() + 1:, :]
    if low.size == 0 or low.shape != high.shape:
        return None
    pattern = lcg_bytes(low.size).reshape(low.shape) & 0x0F
    data = (((high ^ pattern) << 4) | (low ^ pattern)).astype(np.uint8).tobytes()
    try:
        raw = zlib.decompressobj().decompress(data)  # the block repeats the data after its end: ignored
    except zlib.error:
        return None
    return decode_json(raw, "the picture's pixels")


def read_image_embedding(path: Path) -> tuple[dict, str]:
    """(embedding dict, 'text chunk' or 'pixels') of an A1111 image embedding, in A1111's order."""
    try:
        img = Image.open(path)
        if img.size[0] * img.size[1] > MAX_PIXELS:
            raise ImageEmbeddingError(f"{path} is {img.size[0]}x{img.size[1]} pixels, more than persviz reads "
                                      f"({MAX_PIXELS:,}); an A1111 image embedding is a small picture: pass its .pt")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        kind = sniff_image(path.read_bytes()[:16])
        hint = (" install and import a Pillow JPEG XL plugin (pip install pillow-jxl-plugin), or convert it to PNG "
                "losslessly" if kind == "jxl" else " the file may be truncated; copy it again")
        raise ImageEmbeddingError(f"{path} is a {kind or 'picture'} file Pillow cannot open ({err});{hint}") from None
    text = getattr(img, "text", None) or {}
    if TEXT_CHUNK in text:
        return decode_text_chunk(text[TEXT_CHUNK], str(path)), "text chunk"
    data = decode_pixels(np.asarray(img.convert("RGB")))
    if data is None:
        raise ImageEmbeddingError(
            f"{path} is a picture without an embedding (no {TEXT_CHUNK} text chunk, and its pixels hold no A1111 "
            f"encoding): it is a preview image or was re-encoded lossily; pass the embedding's .pt or the PNG "
            f"A1111 saved in image_embeddings/")
    return data, "pixels"


__all__ = ["ImageEmbeddingError", "TEXT_CHUNK", "decode_json", "decode_pixels", "decode_text_chunk", "lcg_bytes",
           "read_image_embedding", "sniff_image"]
