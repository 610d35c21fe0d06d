"""Concept proposal for FineXL: which low-level aspects might the personalization have changed?

Every proposer is a callable ``(base_images, personalized_images) -> list[str]`` over
paired samples (uint8 ``[N, H, W, 3]`` each, row n of both from the same prompt and seed)
that returns short aspect phrases ("warm colors", "thick outlines"). The candidates are
then mapped to text directions f(C) and ranked against V_div (`rank_concepts`), filtered
for orthogonality and decomposed (`persviz.finexl.decompose`).

Proposers:
    BankProposer(phrases)            an offline concept bank (no model): `SHAPESWORLD_BANK`
                                     for the renderer's style knobs, `ART_BANK` (about 40
                                     phrases) for real models; `default_bank()` picks by scale.
                                     `SHAPESWORLD_WORD_BANK`: proxies in the words the embedded
                                     ShapesWorld CLIP can read.
    OpenAIChatProposer(base_url, model)  any OpenAI-compatible chat-completions server
                                     (OpenAI GPT-4o, vLLM, Ollama, LM Studio) through urllib.
    TransformersVLMProposer(model)   a local transformers "image-text-to-text" pipeline.

Grammar-aware directions (ShapesWorld): ``concept_directions(..., compose=shapesworld_compose)`` writes each
word into the caption where its grammar puts it ("a small red *striped* circle ...") instead of appending
", striped"; `SHAPESWORLD_WORD_PHRASES` and `readable` give the sentences readable names.

Pipeline::

    phrases = OpenAIChatProposer("http://localhost:8000/v1", "qwen2-vl", fallback=ART_BANK)(imgs_b, imgs_p)
    f = concept_directions(encoder.embed_texts, probes, phrases)
    ranked = rank_concepts(v_div, f)        # [(phrase, cos(f(C), v_div)), ...], most relevant first
"""
from __future__ import annotations

import ast
import base64
import dataclasses
import io
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from persviz.errors import PersvizError
from persviz.finexl.decompose import Decomposition, check_v_div, concept_matrix, concept_direction
from persviz.finexl.generators import check_pairs, parse_caption
from persviz.shapesworld.captions import caption_from, full_attributes
from persviz.shapesworld.scene import BACKGROUNDS, COLORS, SIZES, TEXTURES
from persviz.images import as_uint8
from persviz.loading import ModelNotAvailableError, unavailable_error
from persviz.shapesworld.render import Style

# ----------------------------------------------------------------------------- concept banks

#: Low-level aspects of ShapesWorld images: the renderer's style knobs in both directions,
#: plus textures and brightness. Phrases are base forms ("warm colors", not "warmer colors")
#: because `persviz.finexl.decompose.explain` adds the comparison: "much more warm colors (0.62)".
SHAPESWORLD_BANK: tuple[str, ...] = (
    "warm colors", "cool colors", "saturated colors", "faded colors", "dark background", "light background",
    "thick outlines", "thin outlines", "blurry", "sharp edges", "fine patterns", "coarse patterns",
    "large objects", "small objects", "noisy", "clean", "striped texture", "dotted texture", "checkered texture",
    "plain texture", "bright", "dark", "high contrast", "low contrast",
)

#: The same aspects as far as ShapesWorld's own words can say them (every word is one token
#: of the embedded ShapesWorld CLIP, which never saw "warm" or "blurry" in training and so
#: gives `SHAPESWORLD_BANK`'s phrases no meaning). Proxies only: "on a black background" for
#: a darker background, "orange"/"red" for warmer colors, "large"/"small" for size; blur,
#: outlines and noise have no word.
SHAPESWORLD_WORD_BANK: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "gray", "on a black background",
    "on a white background", "on a navy background", "on a beige background", "large", "small", "striped",
    "dotted", "checkered", "plain",
)

#: Low-level aspects of art and photographs, for real models (full scale).
ART_BANK: tuple[str, ...] = (
    "watercolor painting", "oil painting", "pencil sketch", "ink drawing", "cartoon style", "anime style",
    "pixel art", "impressionist brushstrokes", "cubist shapes", "pop art", "ukiyo-e woodblock print",
    "3d render", "photorealistic", "vintage photo", "warm color palette", "cool color palette",
    "pastel colors", "vivid saturated colors", "muted colors", "black and white", "sepia tone",
    "high contrast", "low contrast", "soft lighting", "dramatic lighting", "golden hour light",
    "dark moody atmosphere", "bright and airy", "neon glow", "film grain", "blurry background",
    "shallow depth of field", "sharp fine details", "smooth gradients", "thick brushstrokes", "bold outlines",
    "flat shading", "geometric patterns", "textured canvas", "minimalist composition", "detailed busy scene",
    "close-up view",
)

#: Style knob -> (its default, phrase when the personalized value is larger, phrase when smaller).
STYLE_ASPECTS: dict[str, tuple[float, str, str]] = {
    "warmth": (0.0, "warm colors", "cool colors"),
    "saturation": (1.0, "saturated colors", "faded colors"),
    "bg_darkness": (0.0, "dark background", "light background"),
    "outline": (0.0, "thick outlines", "thin outlines"),
    "blur": (0.0, "blurry", "sharp edges"),
    "texture_density": (1.0, "fine patterns", "coarse patterns"),
    "size_scale": (1.0, "large objects", "small objects"),
    "noise": (0.0, "noisy", "clean"),
}


def default_bank(scale: str = "shapesworld") -> tuple[str, ...]:
    """`SHAPESWORLD_BANK` at the embedded default scale, `ART_BANK` at scale 'full' (pass the session's scale)."""
    if scale not in ("shapesworld", "full"):
        raise ValueError(f"scale must be 'shapesworld' or 'full'; got {scale!r}")
    return ART_BANK if scale == "full" else SHAPESWORLD_BANK


def known_levels(base: Style, personalized: Style) -> dict[str, float]:
    """The exactly known personalization between two renderer styles, as ``{phrase: level}``.

    For each knob that differs, the phrase of its direction (`STYLE_ASPECTS`) with the
    absolute change in the knob's own unit (e.g. ``Style(warmth=0.6)`` vs ``Style()``:
    ``{"warm colors": 0.6}``). Levels compare across models within one knob (rank
    agreement, the paper's single-aspect accuracy), not across knobs.
    """
    for s, what in ((base, "base"), (personalized, "personalized")):
        if not isinstance(s, Style):
            raise TypeError(f"{what} must be a Style, got {type(s).__name__}.")
    out = {}
    for knob, (_, up, down) in STYLE_ASPECTS.items():
        d = float(getattr(personalized, knob)) - float(getattr(base, knob))
        if d != 0.0:
            out[up if d > 0 else down] = abs(d)
    return out


# ----------------------------------------------------------------------------- ranking


def _phrases(phrases: Sequence[str], what: str = "concept phrases") -> list[str]:
    """Distinct, stripped, non-empty phrases (first occurrence kept), or a clear error."""
    if isinstance(phrases, str):
        raise ValueError(f"{what} must be a list of phrases, not a single string ({phrases!r}).")
    out = list(dict.fromkeys(" ".join(str(p).split()) for p in phrases))
    out = [p for p in out if p]
    if not out:
        raise ValueError(f"{what} is empty: there is no candidate concept to explain the personalization with. "
                         f"Use a concept bank (default_bank()) or check the proposer's answers.")
    return out


def concept_directions(text_encoder_fn: Callable[[list[str]], torch.Tensor], probe_prompts: Sequence[str],
                       phrases: Sequence[str],
                       compose: Optional[Callable[[str, str], str]] = None) -> dict[str, torch.Tensor]:
    """``{phrase: f(phrase)}`` with `persviz.finexl.decompose.concept_direction` for every distinct phrase.

    ``compose`` as in `concept_direction` (default: the paper's ", C" append;
    `shapesworld_compose` for grammar-aware directions on ShapesWorld captions).

    Raises:
        ValueError: the phrase list is empty (after dropping blanks and duplicates).
    """
    return {p: concept_direction(text_encoder_fn, probe_prompts, p, compose=compose) for p in _phrases(phrases)}


# ----------------------------------------------------------------------------- grammar-aware f(C) on ShapesWorld

_BG_PHRASE = re.compile(rf"^(?:on an? )?({'|'.join(BACKGROUNDS)}) background$")


def shapesworld_word_attribute(word: str) -> tuple[str, str]:
    """``(attribute, value)`` a ShapesWorld concept word names, e.g. "striped" -> ("texture", "striped").

    Colors, textures and sizes are single words; a background is "on a black background" or
    "black background"; a bare background word ("black", "gray", "navy") is no object color in
    ShapesWorld, so it is read as the background too.

    Raises:
        ValueError: the word names no ShapesWorld attribute value.
    """
    w = " ".join(str(word).lower().split())
    m = _BG_PHRASE.match(w)
    if m:
        return "background", m.group(1)
    for attr, values in (("color", COLORS), ("texture", TEXTURES), ("size", SIZES)):
        if w in values:
            return attr, w
    if w in BACKGROUNDS:
        return "background", w
    raise ValueError(f"{word!r} names no ShapesWorld attribute value: use a color {COLORS}, a texture {TEXTURES}, a "
                     f"size {SIZES} or 'on a <{'|'.join(BACKGROUNDS)}> background' (SHAPESWORLD_WORD_BANK).")


def shapesworld_compose(prompt: str, word: str) -> str:
    """The ShapesWorld caption ``prompt`` with the attribute ``word`` names set to it, in the caption's own grammar.

    "a small red plain circle in the center on a gray background" + "striped" ->
    "a small red striped circle in the center on a gray background"; + "on a black background" ->
    "... on a black background". The paper's f(C) appends ", C" instead, a phrase the
    embedded CLIP never saw in that place; writing C where the grammar puts it makes the
    text direction match the image change (cos 0.98-0.99 on ShapesWorld scene edits vs
    0.49-0.92 for the append). A prompt that already says the word comes back unchanged.

    Args:
        prompt: a ShapesWorld caption at level "full" (every attribute named, e.g. from
            `shapesworld_probes`); a terser caption is completed from ``parse_caption``'s
            default rng, which changes its other words too.
        word: an entry of `SHAPESWORLD_WORD_BANK` (see `shapesworld_word_attribute`).

    Raises:
        ValueError: the prompt is no ShapesWorld caption, or the word names no attribute.
    """
    attr, value = shapesworld_word_attribute(word)
    scene = parse_caption(prompt)
    obj = scene.obj
    if attr == "background":
        scene = dataclasses.replace(scene, background=value)
    else:
        scene = dataclasses.replace(scene, obj=dataclasses.replace(obj, **{attr: value}))
    return caption_from(full_attributes(scene))


#: Readable names of `SHAPESWORLD_WORD_BANK` entries for sentences ("much more black background (0.61)").
SHAPESWORLD_WORD_PHRASES: dict[str, str] = {w: (w[len("on a "):] if w.startswith("on a ") else w)
                                            for w in SHAPESWORLD_WORD_BANK}


def readable(decomposition: Decomposition, phrases: Mapping[str, str]) -> Decomposition:
    """The decomposition with its concept names replaced by ``phrases[name]`` (names not in it kept), for `explain`."""
    return dataclasses.replace(decomposition, names=[phrases.get(n, n) for n in decomposition.names])


def rank_concepts(v_div: torch.Tensor, directions: Mapping[str, torch.Tensor]) -> list[tuple[str, float]]:
    """Concepts ordered by ``|cos(f(C), v_div)|`` (descending), with the signed cosine.

    A positive cosine means the personalization moves images the way appending the phrase
    moves a prompt; a negative one, the opposite way. Zero-norm directions get cosine 0.

    Raises:
        ValueError: empty ``directions``, zero-norm ``v_div``, or mismatched dimensions.
    """
    v = check_v_div(v_div)
    names, mat = concept_matrix(dict(directions), v.shape[0], what="directions")
    norms = np.linalg.norm(mat, axis=0)
    cos = np.where(norms > 1e-12, (mat.T @ v) / (np.where(norms > 1e-12, norms, 1.0) * np.linalg.norm(v)), 0.0)
    order = sorted(range(len(names)), key=lambda i: -abs(cos[i]))
    return [(names[i], float(cos[i])) for i in order]


def bank_candidates(v_div: torch.Tensor, text_encoder_fn: Callable[[list[str]], torch.Tensor],
                    probe_prompts: Sequence[str], bank: Optional[Sequence[str]] = None,
                    top_k: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The bank's phrases most aligned with v_div: ``{phrase: f(phrase)}`` in ranked order.

    Args:
        v_div: [D] divergence vector.
        text_encoder_fn, probe_prompts: as in `persviz.finexl.decompose.concept_direction`.
        bank: phrases (default `default_bank()`).
        top_k: keep the k most relevant (default all).
    """
    f = concept_directions(text_encoder_fn, probe_prompts, default_bank() if bank is None else bank)
    ranked = rank_concepts(v_div, f)
    if top_k is not None:
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        ranked = ranked[:int(top_k)]
    return {name: f[name] for name, _ in ranked}


# ----------------------------------------------------------------------------- proposers


class ConceptProposalError(PersvizError, RuntimeError):
    """A vision-language model gave no usable concept list (timeout, HTTP error, garbage answer)."""


@runtime_checkable
class ConceptProposer(Protocol):
    """``proposer(base_images, personalized_images) -> list[str]`` of short aspect phrases."""

    def __call__(self, base_images: np.ndarray, personalized_images: np.ndarray) -> list[str]: ...


class BankProposer:
    """An offline proposer: always the same phrase list (default `default_bank()`), no model needed.

    Ranking against V_div happens afterwards (`rank_concepts`, `persviz.finexl.decompose.orthogonal_filter`).
    """

    def __init__(self, phrases: Optional[Sequence[str]] = None):
        self.phrases = _phrases(default_bank() if phrases is None else phrases, "the concept bank")

    def __call__(self, base_images=None, personalized_images=None) -> list[str]:
        return list(self.phrases)


INSTRUCTION = (
    "The two images come from two image generators given the same prompt and random seed: the first from a "
    "base model, the second from a personalized version of it. List up to {k} short low-level visual aspects "
    "that the SECOND image shows more of than the first (2 to 4 words each, in base form, such as \"warm "
    "colors\", \"thick outlines\", \"watercolor texture\", \"dark background\", \"faded colors\"). "
    "Describe style, color, texture, lighting, sharpness, line work or object size, not the subject. Answer "
    "with a JSON list of strings only, for example [\"warm colors\", \"blurry\"]."
)

_LIST_KEYS = ("aspects", "concepts", "differences", "phrases", "items", "answer")
_ITEM_KEYS = ("aspect", "concept", "phrase", "name", "difference", "text")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.*\S)\s*$")


def _clean(items, max_words: int) -> list[str]:
    out = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[k] for k in _ITEM_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str):
            continue
        p = " ".join(item.split()).strip(" \"'`*.,;:!").lower()
        p = re.sub(r"^(?:much |slightly )?more (?=\S)", "", p)  # explain() says "more" itself
        if p and len(p.split()) <= max_words and len(p) <= 60:
            out.append(p)
    return list(dict.fromkeys(out))


def _list_in(obj) -> Optional[list]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for k in _LIST_KEYS:
            if isinstance(obj.get(k), list):
                return obj[k]
        lists = [v for v in obj.values() if isinstance(v, list)]
        return lists[0] if len(lists) == 1 else None
    return None


def parse_concept_list(text: str, max_words: int = 6) -> list[str]:
    """Aspect phrases from a model's answer, read robustly.

    Accepted: a JSON list of strings (alone, inside a ```json fence, or inside prose: the
    outermost ``[...]``), a JSON object holding one such list (``{"aspects": [...]}``),
    list items that are objects with an "aspect"/"concept"/"name" field, a Python-style
    list with single quotes, or bulleted / numbered lines. Phrases are lower-cased,
    stripped of quotes, trailing punctuation and a leading "more " (`persviz.finexl.decompose.explain`
    adds the comparison itself), de-duplicated; phrases longer than
    ``max_words`` words or 60 characters are dropped.

    Raises:
        ConceptProposalError: no phrase could be read ("garbage answer").
    """
    if not isinstance(text, str) or not text.strip():
        raise ConceptProposalError("the model's answer is empty: expected a JSON list of aspect phrases.")
    t = text.strip()
    chunks = [m.group(1) for m in re.finditer(r"```(?:json|python)?\s*(.*?)```", t, re.S)] + [t]
    i, j = t.find("["), t.rfind("]")
    if 0 <= i < j:
        chunks.append(t[i:j + 1])
    i, j = t.find("{"), t.rfind("}")
    if 0 <= i < j:
        chunks.append(t[i:j + 1])
    for chunk in chunks:
        for loads in (json.loads, ast.literal_eval):
            try:
                obj = loads(chunk.strip())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            items = _list_in(obj)
            if items is not None:
                phrases = _clean(items, max_words)
                if phrases:
                    return phrases
    phrases = _clean([m.group(1) for m in map(_BULLET.match, t.splitlines()) if m], max_words)
    if phrases:
        return phrases
    raise ConceptProposalError(f"garbage answer: no list of short aspect phrases found in {t[:200]!r}"
                               f"{'...' if len(t) > 200 else ''}.")


def _upscaled(img: np.ndarray, min_side: int) -> Image.Image:
    """PIL image, enlarged by an integer factor (nearest) so its shorter side reaches min_side."""
    pil = Image.fromarray(img)
    factor = max(1, -(-int(min_side) // min(img.shape[:2]))) if min_side else 1
    return pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST) if factor > 1 else pil


def png_data_url(image: np.ndarray, min_side: int = 0) -> str:
    """One uint8 [H, W, 3] image as a ``data:image/png;base64,...`` URL (the OpenAI "image_url" format)."""
    buf = io.BytesIO()
    _upscaled(as_uint8(image)[0], min_side).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _PairProposer:
    """Shared loop: ask about each pair, union the phrases, handle failures and the fallback."""

    fallback: Optional[list[str]]
    max_pairs: int
    max_concepts: int

    def _ask(self, base: np.ndarray, personal: np.ndarray) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, base_images: np.ndarray, personalized_images: np.ndarray) -> list[str]:
        """Union of the phrases proposed for the first ``max_pairs`` pairs (first occurrence order).

        A transport failure (timeout, HTTP error, unreachable server, model error) stops at
        once; a garbage answer skips that pair. If no pair gave phrases: with ``fallback``
        None, ConceptProposalError; otherwise a UserWarning and the fallback phrases.
        ``self.answers`` and ``self.errors`` keep the raw answers and error messages.
        """
        b, p = check_pairs(base_images, personalized_images, self.max_pairs)
        self.answers: list[str] = []
        self.errors: list[str] = []
        phrases: list[str] = []
        for k in range(len(b)):
            try:
                answer = self._ask(b[k], p[k])
            except ConceptProposalError as err:
                self.errors.append(f"pair {k}: {err}")
                break
            self.answers.append(answer)
            try:
                phrases.extend(parse_concept_list(answer))
            except ConceptProposalError as err:
                self.errors.append(f"pair {k}: {err}")
        phrases = list(dict.fromkeys(phrases))[:self.max_concepts]
        if phrases:
            if self.errors:
                warnings.warn(f"{type(self).__name__}: {len(self.errors)} pair(s) failed and were skipped: "
                              f"{self.errors[0]}", UserWarning, stacklevel=2)
            return phrases
        msg = f"{type(self).__name__} got no concept phrases: {'; '.join(self.errors) or 'empty answers'}"
        if self.fallback is None:
            raise ConceptProposalError(msg + ". Pass fallback=default_bank() to use the offline concept bank instead.")
        warnings.warn(msg + f". Falling back to the {len(self.fallback)} phrases of the given fallback.",
                      UserWarning, stacklevel=2)
        return list(self.fallback)


class OpenAIChatProposer(_PairProposer):
    """Concept proposal by a vision-language model behind an OpenAI-compatible chat-completions API.

    Sends one request per image pair to ``{base_url}/chat/completions``: a user message with
    the instruction and the two images as base64 PNG data URLs (``{"type": "image_url",
    "image_url": {"url": "data:image/png;base64,..."}}``), base image first. Uses only
    urllib; loopback servers (localhost, 127.0.0.1, ::1) are reached without any proxy.

    Args:
        base_url: e.g. "https://api.openai.com/v1" or "http://localhost:8000/v1" (a URL
            that already ends with "/chat/completions" is used as is).
        model: the served model name, e.g. "gpt-4o" (the paper's best proposer).
        api_key: sent as a Bearer token; None reads the OPENAI_API_KEY environment
            variable, and sends no Authorization header when that is unset either.
        timeout: seconds to wait for each answer.
        fallback: None (default): any failure raises ConceptProposalError. A phrase list
            (e.g. ``default_bank()``): when no pair gives phrases (timeout, HTTP error,
            unreachable server, garbage answers), warn and return these phrases instead.
        max_pairs: how many pairs to ask about (one request each).
        max_concepts: at most this many phrases in the union; also asked of the model per pair.
        min_side: small images are enlarged (nearest, integer factor) to this side first.
        instruction: the prompt; ``{k}`` is replaced by ``max_concepts``.
        temperature: sampling temperature sent with the request.
    """

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout: float = 60.0,
                 fallback: Optional[Sequence[str]] = None, max_pairs: int = 4, max_concepts: int = 10,
                 min_side: int = 256, instruction: str = INSTRUCTION, temperature: float = 0.0):
        url = str(base_url).rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http(s) URL such as 'http://localhost:8000/v1', got {base_url!r}.")
        if not (float(timeout) > 0):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
        if not str(model).strip():
            raise ValueError("model must name the served model, e.g. 'gpt-4o'.")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.timeout = str(model), float(timeout)
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.fallback = _phrases(fallback, "fallback") if fallback is not None else None
        self.max_pairs, self.max_concepts, self.min_side = int(max_pairs), int(max_concepts), int(min_side)
        self.instruction, self.temperature = instruction, float(temperature)
        loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback \
            else urllib.request.build_opener()

    def request_body(self, base: np.ndarray, personal: np.ndarray) -> dict:
        """The chat-completions request for one pair (base image first)."""
        return {
            "model": self.model,
            "temperature": self.temperature,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": self.instruction.replace("{k}", str(self.max_concepts))},
                {"type": "image_url", "image_url": {"url": png_data_url(base, self.min_side)}},
                {"type": "image_url", "image_url": {"url": png_data_url(personal, self.min_side)}},
            ]}],
        }

    def _ask(self, base: np.ndarray, personal: np.ndarray) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(self.request_body(base, personal)).encode("utf-8"),
                                     headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            body = err.read()[:300].decode("utf-8", "replace") if err.fp is not None else ""
            raise ConceptProposalError(f"HTTP {err.code} {err.reason} from {self.url}: {body!r}") from None
        except (TimeoutError, socket.timeout):
            raise ConceptProposalError(f"no answer from {self.url} within timeout={self.timeout:g} s") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise ConceptProposalError(f"no answer from {self.url} within timeout={self.timeout:g} s") from None
            raise ConceptProposalError(f"could not reach {self.url}: {err.reason}") from None
        except OSError as err:
            raise ConceptProposalError(f"connection to {self.url} failed: {err}") from None
        return self._content(raw)

    def _content(self, raw: bytes) -> str:
        """The assistant's text in a chat-completions answer, or ConceptProposalError."""
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ConceptProposalError(f"garbage answer: {self.url} did not answer with JSON: {raw[:200]!r}") from None
        if isinstance(body, dict) and body.get("error"):
            raise ConceptProposalError(f"{self.url} answered with an error: {str(body['error'])[:300]}")
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ConceptProposalError(f"garbage answer: not a chat-completions answer (no "
                                       f"choices[0].message.content): {str(body)[:200]}") from None
        if isinstance(content, list):  # content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ConceptProposalError(f"garbage answer: message content is {type(content).__name__}, not text.")
        return content

    def __repr__(self) -> str:
        return f"OpenAIChatProposer({self.url!r}, model={self.model!r}, timeout={self.timeout:g})"


class TransformersVLMProposer(_PairProposer):
    """Concept proposal by a local transformers vision-language model ("image-text-to-text" pipeline).

    Args:
        model: an already loaded pipeline (any callable taking ``text=`` chat messages), or
            a Hub id / local folder of an image-text-to-text model (e.g. a Qwen2-VL or
            LLaVA checkpoint the user has), loaded with ``transformers.pipeline``.
        device: passed to ``transformers.pipeline`` when loading.
        fallback, max_pairs, max_concepts, min_side, instruction: as in `OpenAIChatProposer`.
        max_new_tokens: generation length per answer.

    Raises:
        ModelNotAvailableError: the model is not in the local cache or folder and cannot
            be downloaded (offline), with the command that fetches it.
    """

    def __init__(self, model, device: Optional[str] = None, fallback: Optional[Sequence[str]] = None,
                 max_pairs: int = 4, max_concepts: int = 10, min_side: int = 256, max_new_tokens: int = 96,
                 instruction: str = INSTRUCTION):
        if isinstance(model, (str, Path)):
            name = str(model)
            try:
                from transformers import pipeline  # heavy: transformers; a VLM proposer is optional
                model = pipeline("image-text-to-text", model=name, device=device)
            except ModelNotAvailableError:
                raise
            except (OSError, ValueError, ImportError, RuntimeError, KeyError) as err:
                raise _vlm_unavailable(name, err) from None
        if not callable(model):
            raise TypeError(f"model must be a Hub id, a local folder or a loaded image-text-to-text pipeline, "
                            f"got {type(model).__name__}.")
        self.pipe = model
        self.fallback = _phrases(fallback, "fallback") if fallback is not None else None
        self.max_pairs, self.max_concepts, self.min_side = int(max_pairs), int(max_concepts), int(min_side)
        self.max_new_tokens, self.instruction = int(max_new_tokens), instruction

    def _ask(self, base: np.ndarray, personal: np.ndarray) -> str:
        messages = [{"role": "user", "content": [
            {"type": "image", "image": _upscaled(base, self.min_side)},
            {"type": "image", "image": _upscaled(personal, self.min_side)},
            {"type": "text", "text": self.instruction.replace("{k}", str(self.max_concepts))},
        ]}]
        try:
            out = self.pipe(text=messages, max_new_tokens=self.max_new_tokens, return_full_text=False)
        except Exception as err:  # a model failure becomes a proposal failure (fallback applies)
            raise ConceptProposalError(f"the vision-language model failed: {type(err).__name__}: {err}") from None
        return _generated_text(out)


def _vlm_unavailable(name: str, err: Exception) -> ModelNotAvailableError:
    """The loading error of a vision-language model, saying what to do offline."""
    local = Path(name).expanduser()
    looks_local = local.exists() or name.startswith((".", "/", "~"))
    if local.exists():
        why = f"'{name}' exists but is not a loadable image-text-to-text model folder ({type(err).__name__}: {err})"
    elif looks_local:
        why = f"the folder '{name}' does not exist"
    else:
        why = str(unavailable_error(name, err)).split(" Download it once")[0] + (
            f" Download it once where there is internet (`hf download {name}`) or pass its local folder")
    return ModelNotAvailableError(
        f"Vision-language model could not be loaded: {why}. No vision-language model ships with persviz: "
        f"offline, propose concepts with BankProposer(default_bank()) or pass fallback=default_bank(); or use "
        f"OpenAIChatProposer with a chat-completions server (vLLM, Ollama, OpenAI).")


def _generated_text(out) -> str:
    """The answer text of a transformers text-generation style output."""
    if isinstance(out, list) and out:
        out = out[0]
    if isinstance(out, list) and out:  # batched: one list per input
        out = out[0]
    if isinstance(out, dict):
        out = out.get("generated_text", "")
    if isinstance(out, list) and out and isinstance(out[-1], dict):  # chat format: last message
        out = out[-1].get("content", "")
    if isinstance(out, list):
        out = " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in out)
    if not isinstance(out, str):
        raise ConceptProposalError(f"garbage answer: unexpected pipeline output {str(out)[:200]}")
    return out


__all__ = [
    "ART_BANK", "SHAPESWORLD_BANK", "SHAPESWORLD_WORD_BANK", "STYLE_ASPECTS", "INSTRUCTION", "BankProposer",
    "ConceptProposalError", "ConceptProposer", "ModelNotAvailableError", "OpenAIChatProposer",
    "TransformersVLMProposer", "bank_candidates", "concept_directions", "default_bank", "known_levels",
    "parse_concept_list", "png_data_url", "rank_concepts", "SHAPESWORLD_WORD_PHRASES", "readable",
    "shapesworld_compose", "shapesworld_word_attribute",
]
