"""Evaluation metrics of TEA Sec. 5 (docs/tea.md §5): CLIP-T (full / concept / context), CLIP-I, DINO-I,
and, on ShapesWorld, the attribute oracle's concept and context accuracy.

Every metric is batched (the evaluators embed in chunks) and scores each image separately; average the returned
per-image values yourself (``.mean()``) for a table entry. Images are uint8 arrays [N, H, W, 3] or lists of PIL
images (``persviz.generation.generate`` returns the former). Evaluators are the ones of ``persviz.loading.load_evaluator``
(anything with ``embed_images`` / ``embed_texts`` returning unit vectors).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

from persviz.images import to_rgb
from persviz.shapesworld.oracle import check_attributes
from persviz.shapesworld.scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEXTURES

ImagesLike = Union[np.ndarray, Sequence[Image.Image]]
TextsLike = Union[str, Sequence[str]]

#: Attributes of the main object (the personal concept) and of its context, as check_attributes names them.
CONCEPT_KEYS = ("shape", "color", "texture", "size")
CONTEXT_KEYS = ("background", "position", "second")
_ALLOWED = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES, "size": SIZES, "background": BACKGROUNDS,
            "position": POSITIONS}


# ----------------------------------------------------------------------------- input checks


def as_images(images: ImagesLike, name: str = "images") -> np.ndarray:
    """Images as a uint8 array [N, H, W, 3] (N >= 1), or a ValueError saying what is wrong."""
    if isinstance(images, Image.Image):
        raise ValueError(f"{name} must be a list of PIL images or a uint8 array [N, H, W, 3]; got one PIL image: "
                         f"wrap it as [image]")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{name} is empty; pass at least one image")
        bad = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if bad:
            raise ValueError(f"{name} is a list, so every item must be a PIL image; item {bad[0]} is a "
                             f"{type(images[bad[0]]).__name__} (pass arrays stacked as one uint8 array [N, H, W, 3])")
        arrays = [to_rgb(im) for im in images]
        sizes = sorted({a.shape[:2] for a in arrays})
        if len(sizes) > 1:
            raise ValueError(f"{name} mixes image sizes {sizes}; resize them to one size first")
        return np.stack(arrays)
    if isinstance(images, torch.Tensor):
        raise ValueError(f"{name} is a torch.Tensor; pass a uint8 numpy array [N, H, W, 3] "
                         f"(persviz.images.as_uint8 converts [N, 3, H, W] tensors in [0, 1])")
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{name} must be a uint8 array [N, H, W, 3] or a list of PIL images; "
                         f"got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (one image: add a first axis, images[None])" if images.ndim == 3 else ""
        raise ValueError(f"{name} must be shaped [N, H, W, 3]; got shape {images.shape}{hint}")
    if images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255); got dtype {images.dtype} "
                         f"(persviz.images.as_uint8 converts floats in [0, 1])")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {images.shape}); pass at least one image")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"{name} has an empty image size (shape {images.shape})")
    return images


def as_texts(texts: TextsLike, n: int, name: str = "texts") -> list[str]:
    """One text per image: a string is repeated n times, a list must hold n non-empty strings."""
    if isinstance(texts, str):
        texts = [texts] * n
    elif not isinstance(texts, Sequence) or isinstance(texts, (bytes, np.ndarray)):
        raise ValueError(f"{name} must be a string or a list of strings; got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty; pass one text for all images or one per image")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{name}[{bad[0]}] is {texts[bad[0]]!r}; every text must be a non-empty string")
    if len(texts) != n:
        raise ValueError(f"got {n} images but {len(texts)} {name}; pass one text for all images or one per image")
    return texts


def _embed_texts(evaluator: Any, texts: list[str]) -> torch.Tensor:
    """Unit text embeddings [N, D], each distinct text embedded once."""
    unique = list(dict.fromkeys(texts))
    emb = evaluator.embed_texts(unique)
    index = {t: i for i, t in enumerate(unique)}
    return emb[torch.tensor([index[t] for t in texts])]


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """CLIPScore of paired unit embeddings [N, D]: 100 * max(cos, 0), float32 [N]."""
    cos = (image_emb.float() * text_emb.float()).sum(-1)
    return 100.0 * cos.clamp(min=0.0)


def mean_cosine(image_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each unit embedding [N, D] to a set of unit embeddings [M, D], float32 [N]."""
    return (image_emb.float() @ ref_emb.float().T).mean(-1)


# ----------------------------------------------------------------------------- CLIP-T


def clip_t(evaluator: Any, images: ImagesLike, texts: TextsLike) -> torch.Tensor:
    """Per-image CLIPScore [N] in the torchmetrics convention, 100 * max(cos(image, text), 0); one text or one per image.

    Args:
        evaluator: a CLIP evaluator (HFClipEvaluator or OpenClipEvaluator) with embed_images / embed_texts.
        images: uint8 [N, H, W, 3] or a list of N PIL images.
        texts: one string for every image, or N strings (image i is scored against texts[i]).
    Returns a float32 CPU tensor [N]. torchmetrics' CLIPScore clamps the *mean* at 0, this clamps each image;
    the two agree whenever every cosine is positive (they are, for CLIP, in practice).
    """
    images = as_images(images)
    texts = as_texts(texts, len(images))
    return clip_score(evaluator.embed_images(images), _embed_texts(evaluator, texts))


def clip_t_parts(
    evaluator: Any, images: ImagesLike, full: TextsLike, concept: TextsLike, context: TextsLike
) -> dict[str, torch.Tensor]:
    """CLIP-T of the same images against the full prompt, its concept part and its context part: {name: [N]}.

    Args:
        full, concept, context: e.g. "a photo of a man holding a dog", "a man", "holding a dog"; each one string
            or one per image (tea_eval_parts.json holds such splits). The images are embedded once.
    Returns {"full": [N], "concept": [N], "context": [N]}, each as clip_t computes it.
    """
    images = as_images(images)
    parts = {"full": as_texts(full, len(images), "full"), "concept": as_texts(concept, len(images), "concept"),
             "context": as_texts(context, len(images), "context")}
    image_emb = evaluator.embed_images(images)
    return {name: clip_score(image_emb, _embed_texts(evaluator, texts)) for name, texts in parts.items()}


# ----------------------------------------------------------------------------- CLIP-I / DINO-I


def image_alignment(evaluator: Any, images: ImagesLike, references: ImagesLike, percent: bool = False) -> torch.Tensor:
    """Per image [N], the mean cosine of its embedding to the embeddings of the M reference images.

    Args:
        evaluator: any evaluator with embed_images returning unit vectors (CLIP for CLIP-I, DINO for DINO-I).
        images: uint8 [N, H, W, 3] or N PIL images; references: uint8 [M, H', W', 3] or M PIL images (any size).
        percent: False (default) gives cosines in [-1, 1]; True multiplies by 100, the scale of the TEA paper's tables.
    Returns a float32 CPU tensor [N]. A generated image identical to a reference is not excluded.
    """
    images, references = as_images(images), as_images(references, "references")
    score = mean_cosine(evaluator.embed_images(images), evaluator.embed_images(references))
    return 100.0 * score if percent else score


def clip_i(evaluator: Any, images: ImagesLike, references: ImagesLike, percent: bool = False) -> torch.Tensor:
    """CLIP-I per image [N]: mean cosine of its CLIP image embedding to those of the reference images (see image_alignment)."""
    return image_alignment(evaluator, images, references, percent)


def dino_i(dino_evaluator: Any, images: ImagesLike, references: ImagesLike, percent: bool = False) -> torch.Tensor:
    """DINO-I per image [N]: mean cosine of its DINO embedding to those of the reference images (see image_alignment)."""
    return image_alignment(dino_evaluator, images, references, percent)


# ----------------------------------------------------------------------------- ShapesWorld oracle


def _named(attrs: Mapping[str, Any] | None, allowed_keys: tuple[str, ...], name: str) -> dict[str, Any]:
    """Checked attributes of one part (concept or context), None values dropped."""
    if attrs is None:
        return {}
    if not isinstance(attrs, Mapping):
        raise ValueError(f"{name} must be a dict of attributes {allowed_keys}; got {type(attrs).__name__}")
    out = {k: v for k, v in attrs.items() if v is not None}
    unknown = sorted(set(out) - set(allowed_keys))
    if unknown:
        other = "context" if name == "concept" else "concept"
        misplaced = [k for k in unknown if k in CONCEPT_KEYS + CONTEXT_KEYS]
        where = f" ({misplaced} belong to {other})" if misplaced else ""
        raise ValueError(f"{name} has unknown attribute(s) {unknown}{where}; use {allowed_keys}")
    for key, value in out.items():
        if key == "second":
            ok = isinstance(value, (tuple, list)) and len(value) == 2 and value[0] in COLORS and value[1] in SHAPES
            if not ok:
                raise ValueError(f"{name}['second'] must be a (color, shape) pair like ('blue', 'square'); got {value!r}")
            out[key] = tuple(value)
        elif value not in _ALLOWED[key]:
            raise ValueError(f"{name}[{key!r}] is {value!r}; choose one of {_ALLOWED[key]}")
    return out


def _check(concept: dict[str, Any], context: dict[str, Any], reading: dict) -> dict[str, bool]:
    """check_attributes with the main object chosen by the concept alone (ties: the one at the named position).

    check_attributes looks for the main object at the named position first, so a concept drawn in the wrong
    slot next to another object would count as a concept failure; here it counts as a position failure only.
    """
    position = context.get("position")
    objs = [(pos, o) for pos in POSITIONS if (o := reading[pos]) is not None]
    if not objs:
        return check_attributes({**concept, **context}, reading)
    main_pos, _ = max(objs, key=lambda po: (sum(po[1][k] == v for k, v in concept.items()), po[0] == position))
    result = check_attributes({**concept, **context, "position": main_pos}, reading)  # main object: the one at main_pos
    if position is None:
        del result["position"]
    else:
        result["position"] = main_pos == position
    return result


def oracle_concept_context(
    oracle: Any, images: ImagesLike, concept: Mapping[str, Any], context: Mapping[str, Any]
) -> dict[str, float]:
    """Fractions of images where the ShapesWorld oracle reads the concept, the context, both, and each attribute right.

    Args:
        oracle: the AttributeOracle (load_evaluator(kind="oracle")), or anything with read(images) -> readings.
        images: uint8 [N, H, W, 3] or N PIL images.
        concept: attributes of the main object, keys of CONCEPT_KEYS, e.g. Concept.attributes()
            ({"shape": "triangle", "color": "orange", "texture": "dotted"}).
        context: keys of CONTEXT_KEYS, e.g. {"background": "navy", "position": "left", "second": ("blue", "circle")}.
            None values are ignored. An empty part is vacuously right (rate 1.0); both empty is an error.
    Returns {"concept", "context", "both"} and one rate per named attribute ("shape", ..., "second"), floats in [0, 1].
    Each image is judged by check_attributes (persviz.shapesworld.oracle). The main object is the present object that
    best matches the concept, wherever it stands (ties go to the object at the named position), so a concept drawn in
    the wrong slot fails "position" only; a named second object must stand in another slot than the main one.
    """
    return {k: float(v.mean()) for k, v in oracle_checks(oracle, images, concept, context).items()}


def oracle_checks(
    oracle: Any, images: ImagesLike, concept: Mapping[str, Any], context: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Per image, whether the oracle reads the concept, the context, both and each named attribute right: bool [N]
    arrays under the keys of oracle_concept_context (whose rates are their means)."""
    images = as_images(images)
    concept_named = _named(concept, CONCEPT_KEYS, "concept")
    context_named = _named(context, CONTEXT_KEYS, "context")
    if not concept_named and not context_named:
        raise ValueError("concept and context name no attribute; name at least one (e.g. concept={'shape': 'circle'})")
    readings = oracle.read(images)
    if len(readings) != len(images):
        raise ValueError(f"the oracle returned {len(readings)} readings for {len(images)} images")
    named = {**concept_named, **context_named}
    checks = [_check(concept_named, context_named, r) for r in readings]

    def ok(keys: Sequence[str]) -> np.ndarray:
        return np.array([all(c[k] for k in keys) for c in checks], dtype=bool)

    out = {"concept": ok(list(concept_named)), "context": ok(list(context_named)), "both": ok(list(named))}
    out.update({k: ok([k]) for k in named})
    return out


# ----------------------------------------------------------------------------- rank correlation


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation of two equally long 1-D sequences, as ``scipy.stats.spearmanr`` (tied values
    share their average rank); NaN when there are fewer than 2 points or either side is constant (no ranking)."""
    a, b = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (x, y))
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"spearman needs two 1-D sequences of one length; got shapes {a.shape} and {b.shape}")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


__all__ = ["clip_t", "clip_t_parts", "clip_i", "dino_i", "image_alignment", "oracle_checks", "oracle_concept_context",
           "spearman",
           "CONCEPT_KEYS", "CONTEXT_KEYS"]
