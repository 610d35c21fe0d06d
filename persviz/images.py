"""Image conversions shared by evaluators, metrics and plots, and the one reader of image files.

:func:`read_image` turns a file of any common mode into uint8 RGB faithfully or refuses it with a sentence:
EXIF orientation is applied; 16-bit grayscale is scaled to 8 bits (v / 257, rounded), not clipped; palette images
keep their colours; transparency (RGBA, LA, a palette's transparent index) is composited over white; CMYK uses
Pillow's conversion, R = (255 - C)(255 - K) / 255; 1-bit, grayscale and YCbCr convert as Pillow does. Floating-point,
32-bit integer images beyond the 16-bit range and other modes are refused, as are images over ``MAX_PIXELS``
(a decompression bomb) and files that do not decode.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from persviz.errors import ImageReadError

MAX_PIXELS = 64_000_000  # a 8000 x 8000 photo; larger files are refused before they are decoded
_PLAIN = ("RGB", "L", "1", "YCbCr", "HSV")
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image, name: str = "the image") -> np.ndarray:
    """uint8 [H, W, 3] of a decoded PIL image of any supported mode (see the module docstring); ImageReadError else."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA") if (mode == "PA" or "transparency" in im.info) else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if mode in _SIXTEEN or mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(f"{name} is a 32-bit integer image with values outside 0..65535; persviz cannot "
                                 "read it faithfully: save it as an 8-bit or 16-bit RGB or grayscale PNG")
        gray = np.round(arr / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "CMYK" or mode in _PLAIN:
        return np.asarray(im.convert("RGB"))
    raise ImageReadError(f"{name} has the image mode {mode!r}, which persviz cannot turn into RGB faithfully; save it "
                         "as an 8-bit RGB PNG or JPEG")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file as uint8 [H, W, 3] (EXIF orientation applied; modes as in to_rgb); an ImageReadError naming
    the file for anything that cannot be read faithfully (not an image, damaged, too large, an unknown mode)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(f"{path} is {w}x{h} pixels, more than persviz reads ({MAX_PIXELS:,}); scale it "
                                     "down (the trainers use 512 px or less)")
            im.load()
            return to_rgb(ImageOps.exif_transpose(im), str(path))
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(f"{path} claims a size too large to decode safely (a decompression bomb); replace it "
                             "with an ordinary photo") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"{path} is not a readable image ({type(e).__name__}: {e}); remove it or replace it") from None


def as_uint8(images) -> np.ndarray:
    """Images as uint8 [N,H,W,3]: from a list of PIL images, uint8 or float [0,1] arrays, or [N,3,H,W] tensors in [0,1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images given")
        images = np.stack([to_rgb(im) if isinstance(im, Image.Image) else np.asarray(im) for im in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images shaped [N,H,W,3] (or PIL images), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise ValueError("images contain NaN or infinite values")
        arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    return arr


def to_pil(images) -> list[Image.Image]:
    """A list of PIL images."""
    return [Image.fromarray(a) for a in as_uint8(images)]


__all__ = ["MAX_PIXELS", "as_uint8", "read_image", "to_pil", "to_rgb"]
