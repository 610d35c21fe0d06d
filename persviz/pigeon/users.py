"""ShapesWorld users with a known taste: Pigeon's data (Xu et al. 2024, Sec. 2.2.4) with exact ground truth.

A user likes 1-2 colors, one texture and one background. Their interaction sequence mixes *liked*
images (single-object scenes in exactly that taste, with varied shape, size and position) with
*noise* images (random scenes that never match the whole taste). As in the paper, training samples
are sliding windows of 6 consecutive interactions: the first 5 are the history, the 6th the target.
A window is used only when its target is a liked image; its request is

- an instruction naming the content, e.g. "a triangle" (the target's shape);
- a reference image: the target's content (shape, size, position) in a random style;

and the ground-truth target is that content rendered in the user's taste.

Exact noise rate. The noise positions of a user repeat with period 6 (a fixed set of ``k`` residues
mod 6, with ``k = noise_rate * 5``). The 5 history slots before a liked target cover the other five
residues, so EVERY history of every window holds exactly ``k`` noise images, at slots that shift
from window to window (for evenly spaced residues such as {0, 2, 4} they stay put for that user; the
residues are drawn per user, so across users every slot is noisy). ``noise_rate`` must therefore be
a multiple of 1/5.

Two noise regimes (``make_users(regime=...)``, ``REGIMES``):

- ``regime="image"`` (the default, and the shipped results): whole-image noise, as described above. The
  noise is whole images, so a mask that keeps a fixed share of every image's tokens cannot remove it.
- ``regime="token"``: token-level noise. Every interaction is a liked image, and every HISTORY image
  also shows distractor objects (a color that is not a favourite, a texture that is not the favourite)
  in the half of the image the liked object leaves free (the liked object stands left or right). The
  renderer knows where every pixel comes from (``shapesworld.render.render_layers``), so each of the
  16 visual tokens (a 4x4 grid of 8x8 patches, the ShapesWorld CLIP's) is labelled: a *distractor
  token* when at least half of its patch shows a distractor. ``noise_rate`` is then the share of
  history tokens that are distractor tokens (at most ``MAX_TOKEN_NOISE_RATE``); at 0.2 a history
  image has about 3.2 distractor tokens, about what Pigeon's history mask drops (20 % of 16). The
  target is the liked image without its distractors (the content in the user's taste). Per-residue
  token counts repeat with period 6 as above, so every window's rate lies within 1/80 of the
  requested one (``PigeonDataset.token_noise_rate`` measures it from the renders).
- ``regime="decoy"``: the token regime with distractors that contradict the taste consistently. Each user also has
  a *decoy style* (``User.decoy``: one color that is not a favourite and one texture that is not the favourite,
  drawn from its own stream ``[seed, user_id, 2]``), and every distractor of that user carries it. In the token
  regime each distractor draws its color and texture afresh, so across a history the distractors disagree with each
  other and the liked objects' taste stands out; here they form a rival taste as consistent as the real one, which
  a model that copies the history's distractors would follow. Everything else (scenes, distractor shapes, places
  and token counts, references) is the token regime's, draw for draw: the same user differs only in the
  distractors' color and texture.

Everything is determined by ``seed``: user ``u`` is drawn from ``numpy.random.default_rng([seed, u])``
(adding users does not change earlier ones) and the image of interaction ``i`` is rendered with the
generator ``[seed, u, i, 0]`` (the same image in every window that contains it; its reference scene
with ``[seed, u, i, 1]``). Splits are by user.

Usage::

    users = make_users(200, seed=0, noise_rates=(0.0, 0.2, 0.4))
    splits = split_users(users, seed=0)             # {"train": [...], "val": [...], "test": [...]}
    train = PigeonDataset(splits["train"], seed=0)
    sample = train[0]   # history [5, 3, 32, 32], reference / target [3, 32, 32] in [-1, 1], instruction str

    token_users = make_users(200, seed=0, noise_rates=(0.0, 0.2, 0.4), regime="token")
    sample = PigeonDataset(token_users)[0]   # + "history_distractor_tokens" bool [5, 16]
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# REGIMES, the noise regimes: "image" (whole noise images; the default and the shipped results) and "token"
# (every history image shows a liked object beside distractor objects; ``noise_rate`` is the share of distractor
# tokens); in persviz.constants so that the command line shows them without importing torch.
from persviz.constants import REGIMES, TOKEN_REGIMES
from persviz.shapesworld.captions import concept_phrase
from persviz.shapesworld.render import RADIUS, SLOT_X, SUPERSAMPLE, Placed, render_layers, shape_mask
from persviz.shapesworld.scene import (BACKGROUNDS, COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, TEXTURES, Obj, Scene,
                                 sample_scene)

#: History images per window (the paper's 5).
HISTORY_LEN = 5
#: Interactions per sliding window: 5 history + 1 target.
WINDOW_LEN = HISTORY_LEN + 1
#: Default per-user noise rates (fraction of noise images in every history), assigned in turn.
DEFAULT_NOISE_RATES = (0.0, 0.2, 0.4, 0.6)
#: Default split of the users.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLITS = ("train", "val", "test")
#: Default per-user noise rates of the token regime (share of distractor tokens in every history).
DEFAULT_TOKEN_NOISE_RATES = (0.0, 0.2, 0.4)
#: Visual tokens per image side: the ShapesWorld CLIP's 8-pixel patches on 32x32 images, a 4x4 grid of 16 tokens
#: in row-major order (the order of the vision tower's patch embedding).
TOKEN_GRID = 4
#: Largest token-level noise rate: distractors fill at most the 8 patches of the free half of an image.
MAX_TOKEN_NOISE_RATE = 0.5
#: The renderer's position jitter (``PigeonDataset(jitter=...)``); the token regime keeps distractors clear of it.
JITTER = 0.03


# ----------------------------------------------------------------------------- taste and users


@dataclass(frozen=True)
class Taste:
    """What a user likes: 1-2 object colors, one texture, one background.

    Args:
        colors: favourite colors (1 or 2 distinct names of ``shapesworld.scene.COLORS``).
        texture: favourite texture (one of ``TEXTURES``).
        background: favourite background (one of ``BACKGROUNDS``).
    """

    colors: tuple[str, ...]
    texture: str
    background: str

    def __post_init__(self) -> None:
        colors = (self.colors,) if isinstance(self.colors, str) else tuple(self.colors)
        object.__setattr__(self, "colors", colors)
        if not 1 <= len(colors) <= 2 or len(set(colors)) != len(colors):
            raise ValueError(f"a taste has 1 or 2 distinct colors; got {colors}")
        for c in colors:
            if c not in COLORS:
                raise ValueError(f"unknown color {c!r}; choose from {COLORS}")
        if self.texture not in TEXTURES:
            raise ValueError(f"unknown texture {self.texture!r}; choose from {TEXTURES}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose from {BACKGROUNDS}")

    def matches(self, obj: Obj, background: str) -> bool:
        """True if an object on a background carries the whole taste (color, texture and background)."""
        return obj.color in self.colors and obj.texture == self.texture and background == self.background

    def describe(self) -> str:
        """E.g. 'red or blue, striped, on a navy background'."""
        bg = f"on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background"
        return f"{' or '.join(self.colors)}, {self.texture}, {bg}"


@dataclass(frozen=True)
class User:
    """A user with a taste and an interaction sequence.

    Attributes:
        user_id: index of the user in ``make_users`` (fixes its random stream).
        taste: what the user likes.
        noise_rate: fraction of noise images in every history window (a multiple of 1/5).
        scenes: the interaction sequence (ground-truth scenes), length ``n_interactions``.
        is_noise: per interaction, True for a noise image (never in the token regime).
        references: per interaction, the reference scene used when it is a target (None for noise).
        regime: "image" (whole-image noise), "token" (distractor tokens; ``noise_rate`` is their share) or
            "decoy" (distractor tokens all in the user's decoy style).
        distractors: token regimes: per interaction, the distractor objects drawn beside the liked object when
            the image is in a history (empty in the image regime).
        decoy: decoy regime: the (color, texture) of every distractor; None otherwise.
    """

    user_id: int
    taste: Taste
    noise_rate: float
    scenes: tuple[Scene, ...]
    is_noise: tuple[bool, ...]
    references: tuple[Scene | None, ...]
    regime: str = "image"
    distractors: tuple[tuple[Placed, ...], ...] = ()
    decoy: tuple[str, str] | None = None

    def distractors_of(self, index: int) -> tuple[Placed, ...]:
        """The distractor objects of interaction ``index`` as a history image (empty in the image regime)."""
        return self.distractors[index] if self.distractors else ()

    def window_starts(self, history_len: int = HISTORY_LEN) -> list[int]:
        """Start index of each usable window (its target, at ``start + history_len``, is a liked image)."""
        return [s for s in range(len(self.scenes) - history_len) if not self.is_noise[s + history_len]]


@dataclass(frozen=True)
class Window:
    """One training / test sample: 5 history interactions, then the target; all scenes are ground truth."""

    user_id: int
    start: int
    taste: Taste
    history: tuple[Scene, ...]
    history_is_noise: tuple[bool, ...]
    reference: Scene
    target: Scene
    instruction: str
    history_distractors: tuple[tuple[Placed, ...], ...] = ()


def instruction_for(scene: Scene) -> str:
    """The instruction naming a target's content: its shape, e.g. 'a triangle'."""
    return concept_phrase(scene.obj.shape)


def _check_noise_rate(rate: Any, history_len: int) -> tuple[float, int]:
    """Validate a noise rate; return it and the number of noise images per history."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or math.isnan(float(rate)):
        raise ValueError(f"noise rate must be a number in [0, 1]; got {rate!r}")
    r = float(rate)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"noise rate {r} is outside [0, 1]; it is the fraction of the {history_len} history "
                         f"images that are noise, pass e.g. 0.2 (one noise image) or 0.4 (two)")
    k = round(r * history_len)
    if abs(r * history_len - k) > 1e-9:
        allowed = ", ".join(f"{i / history_len:g}" for i in range(history_len + 1))
        raise ValueError(f"noise rate {r} is not a whole number of the {history_len} history images; "
                         f"use one of {allowed}")
    return k / history_len, k


def _draw_taste(rng: np.random.Generator, n_colors: Sequence[int]) -> Taste:
    n = int(n_colors[rng.integers(len(n_colors))])
    colors = tuple(COLORS[i] for i in sorted(rng.choice(len(COLORS), size=n, replace=False)))
    return Taste(colors, TEXTURES[rng.integers(len(TEXTURES))], BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def liked_scene(taste: Taste, rng: np.random.Generator, positions: Sequence[str] = POSITIONS) -> Scene:
    """A single-object scene in the taste: varied shape, size and position (one of ``positions``); color from
    the favourites."""
    obj = Obj(SHAPES[rng.integers(len(SHAPES))], taste.colors[rng.integers(len(taste.colors))], taste.texture,
              SIZES[rng.integers(len(SIZES))])
    return Scene(obj, taste.background, positions[rng.integers(len(positions))])


def noise_scene(taste: Taste, rng: np.random.Generator, p_second: float = 0.3) -> Scene:
    """A random scene (``sample_scene``) that does not carry the whole taste."""
    while True:
        s = sample_scene(rng, p_second)
        if not taste.matches(s.obj, s.background):
            return s


def reference_scene(target: Scene, taste: Taste, rng: np.random.Generator) -> Scene:
    """The target's content (shape, size, position) in a random style that is not the whole taste."""
    while True:
        obj = Obj(target.obj.shape, COLORS[rng.integers(len(COLORS))], TEXTURES[rng.integers(len(TEXTURES))],
                  target.obj.size)
        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if not taste.matches(obj, bg):
            return Scene(obj, bg, target.position)


# ----------------------------------------------------------------------------- token-level noise


def _check_token_rate(rate: Any) -> float:
    """Validate a token-level noise rate (share of distractor tokens) in [0, MAX_TOKEN_NOISE_RATE]."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or math.isnan(float(rate)):
        raise ValueError(f"noise rate must be a number in [0, {MAX_TOKEN_NOISE_RATE}]; got {rate!r}")
    r = float(rate)
    if not 0.0 <= r <= MAX_TOKEN_NOISE_RATE:
        raise ValueError(f"token-level noise rate {r} is outside [0, {MAX_TOKEN_NOISE_RATE}]: it is the share of "
                         f"history tokens that show a distractor, and distractors fill at most the 8 tokens of the "
                         f"half the liked object leaves free; pass e.g. 0.2 or 0.4")
    return r


def _check_regime(regime: Any) -> str:
    if regime not in REGIMES:
        raise ValueError(f"regime={regime!r}; use 'image' (whole noise images), 'token' (distractor tokens "
                         f"inside liked images) or 'decoy' (distractor tokens in one decoy style per user)")
    return regime


@functools.lru_cache(maxsize=None)
def _half_width(shape: str) -> float:
    """Largest |u| of a shape's mask in units of its radius (how far it reaches sideways from its centre)."""
    g = np.linspace(-1.5, 1.5, 1201)
    u, v = np.meshgrid(g, g, indexing="xy")
    return float(np.abs(u[shape_mask(shape, u, v)]).max())


@functools.lru_cache(maxsize=1)
def distractor_layouts() -> dict[int, np.ndarray]:
    """Where a distractor can stand in a 2x2-token block (16x16 px of a 32 px image) and how many tokens it takes.

    The block's x = 0 is its edge towards the liked object. Every shape of ``SHAPES`` at radii 3..8 px and
    centres on a 0.5 px grid is drawn with the renderer's ``shape_mask`` at its supersampling; a layout is kept
    when the object lies wholly inside the block and every one of the 4 patches is clearly (by more than 1/64)
    above or below half covered.

    Returns:
        {token count: float array [N, 5] of (shape index in SHAPES, radius px, centre x px, centre y px,
        distance px of the object from the block's inner edge)} for counts 1 to 4.
    """
    side, ss = IMAGE_SIZE // 2, SUPERSAMPLE
    c = (np.arange(side * ss) + 0.5) / ss
    x, y = np.meshgrid(c, c, indexing="xy")
    g = np.linspace(-1.5, 1.5, 1201)
    gu, gv = np.meshgrid(g, g, indexing="xy")
    rows: dict[int, list[np.ndarray]] = {k: [] for k in range(1, 5)}
    centres = np.arange(0.0, side + 0.01, 0.5)
    cx, cy = (a.ravel() for a in np.meshgrid(centres, centres, indexing="xy"))
    for si, shape in enumerate(SHAPES):
        m0 = shape_mask(shape, gu, gv)
        u0, u1, v0, v1 = gu[m0].min(), gu[m0].max(), gv[m0].min(), gv[m0].max()
        for r in np.arange(3.0, 8.01, 0.25):
            ok = (cx + r * u0 >= 0) & (cx + r * u1 <= side) & (cy + r * v0 >= 0) & (cy + r * v1 <= side)
            px, py = cx[ok], cy[ok]
            if not len(px):
                continue
            m = shape_mask(shape, (x[None] - px[:, None, None]) / r, (y[None] - py[:, None, None]) / r)
            half = side * ss // 2
            share = m.reshape(len(px), 2, half, 2, half).mean(axis=(2, 4)).reshape(len(px), 4)
            clear = np.all(np.abs(share - 0.5) > 1 / 64, axis=1)
            count = (share >= 0.5).sum(1)
            for k in range(1, 5):
                sel = clear & (count == k)
                if sel.any():
                    rows[k].append(np.stack([np.full(sel.sum(), si), np.full(sel.sum(), r), px[sel], py[sel],
                                             px[sel] + r * u0], 1))
    return {k: np.concatenate(v) for k, v in rows.items() if v}


def distractor_obj(taste: Taste, shape: str, rng: np.random.Generator) -> Obj:
    """An object of no favourite color and not the favourite texture (its size is set by its placement)."""
    colors = [c for c in COLORS if c not in taste.colors]
    textures = [t for t in TEXTURES if t != taste.texture]
    return Obj(shape, colors[rng.integers(len(colors))], textures[rng.integers(len(textures))], "small")


def decoy_style(taste: Taste, seed: int, user_id: int) -> tuple[str, str]:
    """The decoy regime's (color, texture) of a user: a color that is not a favourite and a texture that is not the
    favourite, drawn from ``numpy.random.default_rng([seed, user_id, 2])`` (a stream of its own, so the user's
    other draws are the token regime's)."""
    rng = np.random.default_rng([seed, int(user_id), 2])
    colors = [c for c in COLORS if c not in taste.colors]
    textures = [t for t in TEXTURES if t != taste.texture]
    return colors[rng.integers(len(colors))], textures[rng.integers(len(textures))]


def place_distractors(liked: Scene, taste: Taste, n_tokens: int, rng: np.random.Generator,
                      jitter: float = JITTER, style: tuple[str, str] | None = None) -> tuple[Placed, ...]:
    """Distractor objects beside the liked object of a history image, covering about ``n_tokens`` of its tokens.

    The liked object stands left or right; the distractors fill the other half (2 x 4 tokens): up to 4 tokens
    one object in the top or bottom 2x2 block, 5 to 8 tokens one object per block. Layouts come from
    ``distractor_layouts`` and stay clear of the liked object wherever the renderer's jitter puts it. Where no
    layout takes the count next to a wide liked object (a large diamond leaves no room for 4), the next lower
    count is used; the dataset measures the real labels from the renders.

    Args:
        liked: the liked scene (one object, at "left" or "right").
        taste: the user's taste (distractors carry none of its colors and not its texture).
        n_tokens: distractor tokens wanted, 0 to 8.
        rng: the user's random stream.
        jitter: the renderer's position jitter (units of the image side).
        style: (color, texture) of every distractor (the decoy regime's ``decoy_style``); None: drawn per object
            (``distractor_obj``). The draws from ``rng`` are the same either way.
    """
    if liked.position not in ("left", "right") or liked.second is not None:
        raise ValueError(f"distractors stand beside a single liked object at 'left' or 'right'; got position "
                         f"{liked.position!r}" + (" with a second object" if liked.second is not None else ""))
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or not 0 <= n_tokens <= 8:
        raise ValueError(f"n_tokens must be an int in 0..8 (the free half holds 8 tokens); got {n_tokens!r}")
    if n_tokens == 0:
        return ()
    side = IMAGE_SIZE // 2
    # px the liked object may reach into the free half (its slot is mirrored left / right), plus a 0.25 px margin
    reach = (SLOT_X["left"] + jitter + RADIUS[liked.obj.size] * _half_width(liked.obj.shape)) * IMAGE_SIZE
    intrusion = reach - side + 0.25
    counts = [int(n_tokens)] if n_tokens <= 4 else [int(math.ceil(n_tokens / 2)), int(n_tokens // 2)]
    blocks = [int(rng.integers(2))] if len(counts) == 1 else [int(b) for b in rng.permutation(2)]
    table = distractor_layouts()
    out = []
    for count, block in zip(counts, blocks):
        while count > 0:
            rows = table.get(count)
            rows = rows[rows[:, 4] >= intrusion] if rows is not None else None
            if rows is not None and len(rows):
                break
            count -= 1
        if count == 0:
            continue
        shapes = np.unique(rows[:, 0])
        shape = int(shapes[rng.integers(len(shapes))])
        rows = rows[rows[:, 0] == shape]
        _, r, cx, cy, _ = rows[rng.integers(len(rows))]
        x = side + cx if liked.position == "left" else side - cx
        obj = distractor_obj(taste, SHAPES[shape], rng)
        if style is not None:
            if style[0] in taste.colors or style[1] == taste.texture:
                raise ValueError(f"the decoy style {style} shares an attribute with the taste ({taste.describe()})")
            obj = Obj(obj.shape, style[0], style[1], obj.size)
        out.append(Placed(obj, float(x / IMAGE_SIZE),
                          float((cy + side * block) / IMAGE_SIZE), float(r / IMAGE_SIZE)))
    return tuple(out)


def token_counts(noise_rate: float, rng: np.random.Generator, history_len: int = HISTORY_LEN,
                 n_tokens: int = TOKEN_GRID ** 2) -> list[int]:
    """Distractor tokens per interaction residue (mod ``history_len + 1``) for a token-level noise rate.

    The counts sum to ``S = round(noise_rate * n_tokens * (history_len + 1))``, differ by at most one, and the
    residues with one more are drawn from ``rng``. A history covers every residue but its target's, so each
    window holds ``S - c`` distractor tokens: within 1/(n_tokens * history_len) of the rate, and on average
    ``S / (n_tokens * (history_len + 1))``, within 0.5 / 96 of it for 16 tokens and 5 images.
    """
    window = history_len + 1
    total = int(round(_check_token_rate(noise_rate) * n_tokens * window))
    base, extra = divmod(total, window)
    counts = [base] * window
    for i in rng.choice(window, size=extra, replace=False):
        counts[int(i)] += 1
    return counts


def token_shares(coverage: np.ndarray, grid: int = TOKEN_GRID) -> np.ndarray:
    """Share of each token's patch covered, [grid * grid] in row-major order, from a coverage map [S, S] in [0, 1]."""
    cov = np.asarray(coverage, dtype=np.float64)
    s = cov.shape[-1]
    if cov.ndim != 2 or cov.shape[0] != s or s % grid:
        raise ValueError(f"coverage must be a square map [S, S] with S a multiple of grid={grid}; got {cov.shape}")
    p = s // grid
    return cov.reshape(grid, p, grid, p).mean(axis=(1, 3)).reshape(-1)


def make_user(user_id: int, seed: int = 0, noise_rate: float = 0.2, n_interactions: int = 12,
              n_colors: Sequence[int] = (1, 2), history_len: int = HISTORY_LEN, p_second: float = 0.3,
              regime: str = "image") -> User:
    """One user, fully determined by (seed, user_id, regime); the taste does not depend on the regime.

    Args:
        user_id: the user's index (>= 0).
        seed: data seed.
        noise_rate: regime "image": fraction of noise images in every history, a multiple of 1/history_len in
            [0, 1]; regime "token": share of distractor tokens in every history, in [0, MAX_TOKEN_NOISE_RATE].
        n_interactions: length of the interaction sequence; at least ``2 * history_len + 1`` so that
            every user has usable windows whatever its noise positions.
        n_colors: the possible numbers of favourite colors (drawn uniformly).
        history_len: history images per window.
        p_second: probability of a second object in a noise scene (image regime).
        regime: "image" (whole noise images, the default) or "token" (liked images with distractor tokens);
            see the module docstring.
    """
    _check_regime(regime)
    if isinstance(user_id, bool) or not isinstance(user_id, (int, np.integer)) or user_id < 0:
        raise ValueError(f"user_id must be an int >= 0; got {user_id!r}")
    if isinstance(history_len, bool) or not isinstance(history_len, (int, np.integer)) or history_len < 1:
        raise ValueError(f"history_len must be a positive int; got {history_len!r}")
    if regime in TOKEN_REGIMES:
        rate, k = _check_token_rate(noise_rate), 0
    else:
        rate, k = _check_noise_rate(noise_rate, history_len)
    window = history_len + 1
    if n_interactions < 2 * history_len + 1:
        raise ValueError(f"n_interactions={n_interactions} is too short: with windows of {window} a user needs "
                         f"at least {2 * history_len + 1} interactions; pass n_interactions >= {2 * history_len + 1}")
    if not n_colors or any(int(n) not in (1, 2) for n in n_colors):
        raise ValueError(f"n_colors must list 1 and/or 2; got {n_colors!r}")
    if not 0.0 <= float(p_second) <= 1.0:
        raise ValueError(f"p_second must lie in [0, 1]; got {p_second}")
    rng = np.random.default_rng([seed, int(user_id)])
    taste = _draw_taste(rng, n_colors)
    if regime in TOKEN_REGIMES:
        decoy = decoy_style(taste, seed, int(user_id)) if regime == "decoy" else None
        counts = token_counts(rate, rng, history_len)
        scenes, refs, placed = [], [], []
        for i in range(n_interactions):
            scenes.append(liked_scene(taste, rng, ("left", "right")))
            refs.append(reference_scene(scenes[-1], taste, rng))
            placed.append(place_distractors(scenes[-1], taste, counts[i % window], rng, style=decoy))
        return User(int(user_id), taste, rate, tuple(scenes), (False,) * n_interactions, tuple(refs), regime,
                    tuple(placed), decoy)
    noise_residues = set(int(x) for x in rng.choice(window, size=k, replace=False))
    scenes, is_noise, refs = [], [], []
    for i in range(n_interactions):
        noisy = (i % window) in noise_residues
        if noisy:
            scenes.append(noise_scene(taste, rng, p_second))
            refs.append(None)
        else:
            scenes.append(liked_scene(taste, rng))
            refs.append(reference_scene(scenes[-1], taste, rng))
        is_noise.append(noisy)
    return User(int(user_id), taste, rate, tuple(scenes), tuple(is_noise), tuple(refs))


def make_users(n_users: int, seed: int = 0, noise_rates: float | Sequence[float] | None = None,
               n_interactions: int = 12, n_colors: Sequence[int] = (1, 2), history_len: int = HISTORY_LEN,
               p_second: float = 0.3, regime: str = "image") -> list[User]:
    """``n_users`` users; user ``u`` gets ``noise_rates[u % len(noise_rates)]`` (a float: the same for all).

    ``noise_rates`` defaults to ``DEFAULT_NOISE_RATES`` (regime "image": whole noise images) or
    ``DEFAULT_TOKEN_NOISE_RATES`` (regime "token": share of distractor tokens). See ``make_user`` for the rest.
    """
    _check_regime(regime)
    if noise_rates is None:
        noise_rates = DEFAULT_TOKEN_NOISE_RATES if regime in TOKEN_REGIMES else DEFAULT_NOISE_RATES
    if isinstance(n_users, bool) or not isinstance(n_users, (int, np.integer)) or n_users < 1:
        raise ValueError(f"n_users must be a positive int; got {n_users!r}")
    rates = (noise_rates,) if isinstance(noise_rates, numbers.Real) else tuple(noise_rates)
    if not rates:
        raise ValueError("noise_rates is empty; pass e.g. (0.0, 0.2, 0.4)")
    for r in rates:
        _check_token_rate(r) if regime in TOKEN_REGIMES else _check_noise_rate(r, history_len)
    return [make_user(u, seed, rates[u % len(rates)], n_interactions, n_colors, history_len, p_second, regime)
            for u in range(int(n_users))]


def split_users(users: Sequence[User], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                seed: int = 0) -> dict[str, list[User]]:
    """Split users (not windows) into train / val / test; no user is in two splits.

    Args:
        users: the users.
        fractions: three non-negative fractions summing to 1.
        seed: seed of the permutation.

    Returns:
        {"train": [...], "val": [...], "test": [...]}, each sorted by user_id.
    """
    f = [float(x) for x in fractions]
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1; "
                         f"got {fractions}")
    ids = [u.user_id for u in users]
    if len(set(ids)) != len(ids):
        raise ValueError("users holds the same user_id twice; build them with make_users")
    n = len(users)
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_val = int(round(f[1] * n))
    n_test = int(round(f[2] * n))
    n_train = n - n_val - n_test
    if n_train < 0 or (f[0] > 0 and n_train == 0):
        raise ValueError(f"{n} users are too few for fractions {fractions}; make more users")
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {k: sorted((users[i] for i in v), key=lambda u: u.user_id) for k, v in parts.items()}


# ----------------------------------------------------------------------------- images and validation


def to_model_images(images: np.ndarray) -> torch.Tensor:
    """uint8 [..., S, S, 3] -> float [..., 3, S, S] in [-1, 1]."""
    a = np.ascontiguousarray(images)
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.movedim(-1, -3).float().div(127.5).sub(1.0)


def as_image_tensor(x: Any, name: str, single_ndim: int, image_size: int) -> tuple[torch.Tensor, bool]:
    """Images as float [B?, ..., 3, S, S] in [-1, 1]; returns (tensor, batched)."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name} is empty")
        items = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else im for im in x]
        if all(isinstance(im, np.ndarray) for im in items):
            x = np.stack(items) if len({im.shape for im in items}) == 1 else items
        elif all(isinstance(im, torch.Tensor) for im in items):
            x = torch.stack(items) if len({tuple(im.shape) for im in items}) == 1 else items
        if isinstance(x, list):
            sizes = sorted({tuple(np.shape(im)) for im in items})
            raise ValueError(f"{name} images have different sizes {sizes}; bring them to "
                             f"{image_size}x{image_size} first")
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(f"{name}: numpy images must be uint8 [..., H, W, 3]; got {x.dtype} (for float images "
                             f"pass a torch tensor [..., 3, H, W] in [-1, 1])")
        if x.ndim < 3 or x.shape[-1] != 3:
            raise ValueError(f"{name}: numpy images must be uint8 [..., H, W, 3]; got shape {x.shape}")
        t = to_model_images(x)
    elif isinstance(x, torch.Tensor):
        if x.dtype == torch.uint8:
            t = to_model_images(x.cpu().numpy())
        elif x.is_floating_point():
            t = x
        else:
            raise ValueError(f"{name}: tensor images must be float in [-1, 1] [..., 3, H, W] or uint8 "
                             f"[..., H, W, 3]; got dtype {x.dtype}")
        if t.ndim < 3 or t.shape[-3] != 3:
            raise ValueError(f"{name}: float images must be [..., 3, H, W] in [-1, 1]; got shape {tuple(x.shape)}")
    else:
        raise ValueError(f"{name} must be a torch tensor, a uint8 numpy array or a list of images; "
                         f"got {type(x).__name__}")
    if t.ndim not in (single_ndim, single_ndim + 1):
        want = "[H, 3, S, S] or [B, H, 3, S, S]" if single_ndim == 4 else "[3, S, S] or [B, 3, S, S]"
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {want} (channels-last for uint8)")
    if tuple(t.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"{name} images are {t.shape[-2]}x{t.shape[-1]} but the models take "
                         f"{image_size}x{image_size}; resize them first (e.g. PIL.Image.resize(({image_size}, "
                         f"{image_size})))")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    batched = t.ndim == single_ndim + 1
    return (t if batched else t.unsqueeze(0)), batched


def check_ratio(ratio: Any, name: str = "reference_ratio") -> float:
    """A mask ratio in [0, 1] (fraction of tokens masked) as a float, or a clear ValueError."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or math.isnan(float(ratio)):
        raise ValueError(f"{name} must be a number in [0, 1]; got {ratio!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"{name} = {ratio} is outside [0, 1]; it is the fraction of reference tokens masked: "
                         f"0 keeps the whole reference, 1 keeps one token; pass a value in between")
    return float(ratio)


def validate_request(history: Any, reference: Any, instruction: str | Sequence[str],
                     reference_ratio: Any = None, n_history: int = HISTORY_LEN,
                     image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Check one request (or a batch) and return model inputs.

    Args:
        history: ``n_history`` images: float tensor [H, 3, S, S] / [B, H, 3, S, S] in [-1, 1], uint8
            array [H, S, S, 3] / [B, H, S, S, 3], or a list of PIL images / uint8 arrays (one request).
        reference: one image per request: [3, S, S] / [B, 3, S, S] (float) or [S, S, 3] / [B, S, S, 3] (uint8).
        instruction: a non-empty string (one request) or B strings.
        reference_ratio: None, or the reference mask ratio(s) in [0, 1] (a float or B floats).
        n_history: history images per request.
        image_size: the models' image size S.

    Returns:
        (history float [B, H, 3, S, S], reference float [B, 3, S, S], instructions list of B strings).
    """
    hist, _ = as_image_tensor(history, "history", 4, image_size)
    ref, _ = as_image_tensor(reference, "reference", 3, image_size)
    if hist.shape[1] != n_history:
        raise ValueError(f"history has {hist.shape[1]} images but Pigeon reads exactly {n_history} (the "
                         f"interactions before the target); pass {n_history} history images")
    texts = [instruction] if isinstance(instruction, str) else list(instruction)
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"instruction {t!r} is empty; name the content to generate, e.g. 'a triangle'")
    b = hist.shape[0]
    if ref.shape[0] != b or len(texts) != b:
        raise ValueError(f"batch sizes differ: {b} histories, {ref.shape[0]} references, {len(texts)} "
                         f"instructions; pass one reference and one instruction per history")
    if reference_ratio is not None:
        ratios = reference_ratio.tolist() if isinstance(reference_ratio, torch.Tensor) else reference_ratio
        for r in (ratios if isinstance(ratios, (list, tuple)) else [ratios]):
            check_ratio(r)
    return hist, ref.to(hist.dtype), texts


# ----------------------------------------------------------------------------- dataset


def windows_of(users: Sequence[User], history_len: int = HISTORY_LEN) -> list[Window]:
    """All usable windows of the users, in order (user, start)."""
    out = []
    for u in users:
        for s in u.window_starts(history_len):
            t = s + history_len
            target, ref = u.scenes[t], u.references[t]
            assert ref is not None
            out.append(Window(u.user_id, s, u.taste, u.scenes[s:t], u.is_noise[s:t], ref, target,
                              instruction_for(target), tuple(u.distractors_of(j) for j in range(s, t))))
    return out


class PigeonDataset(Dataset):
    """Sliding windows of ShapesWorld users as tensors.

    Item ``i`` is a dict: ``history`` float [5, 3, S, S], ``reference`` and ``target`` float [3, S, S]
    (all in [-1, 1]), ``history_is_noise`` bool [5] (whole noise images, image regime),
    ``history_distractor_tokens`` bool [5, 16] (token regime: True where at least half of a token's patch
    shows a distractor; all False in the image regime), ``user_id`` and ``start`` long scalars and
    ``instruction`` (str; ``torch.utils.data.default_collate`` makes a list of them). ``window(i)``
    gives the ground-truth scenes. Images are rendered on first use and kept (uint8). In the token regime the
    history images carry their distractors and the target is the liked image without them.

    Args:
        users: the users (e.g. one split of ``split_users``).
        seed: render seed (position jitter), the same as the users' data seed by convention.
        image_size: rendered size.
        history_len: history images per window.
        jitter: position jitter of the renderer.
        grid: visual tokens per image side (``TOKEN_GRID``: the ShapesWorld CLIP's 4 x 4 patches).
    """

    def __init__(self, users: Sequence[User], seed: int = 0, image_size: int = IMAGE_SIZE,
                 history_len: int = HISTORY_LEN, jitter: float = JITTER, grid: int = TOKEN_GRID) -> None:
        if not users:
            raise ValueError("users is empty; pass at least one User (make_users)")
        if image_size % grid:
            raise ValueError(f"image_size={image_size} must be a multiple of grid={grid} (tokens per side)")
        self.users = {u.user_id: u for u in users}
        self.seed, self.image_size, self.history_len, self.jitter = seed, image_size, history_len, jitter
        self.grid = grid
        self.windows = windows_of(users, history_len)
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._tokens: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, i: int) -> Window:
        """The ground truth of item i."""
        return self.windows[i]

    def image(self, user_id: int, index: int, reference: bool = False, clean: bool = False) -> np.ndarray:
        """uint8 [S, S, 3] of interaction ``index`` of a user (or of its reference scene); ``clean`` leaves its
        distractors out (the target of a token-regime window; the same image in the image regime)."""
        u = self.users[user_id]
        kind = 1 if reference else 2 if clean and u.distractors_of(index) else 0
        key = (user_id, index, kind)
        if key not in self._cache:
            scene = u.references[index] if reference else u.scenes[index]
            if scene is None:
                raise ValueError(f"interaction {index} of user {user_id} is a noise image and has no reference")
            under = u.distractors_of(index) if kind == 0 else ()
            rng = np.random.default_rng([self.seed, user_id, index, int(reference)])
            img, cover = render_layers(scene, under, size=self.image_size, rng=rng, jitter=self.jitter)
            self._cache[key] = img
            if kind == 0 and not reference:
                shares = token_shares(cover[:len(under)].sum(0), self.grid)
                self._tokens[(user_id, index)] = shares >= 0.5
        return self._cache[key]

    def distractor_tokens(self, user_id: int, index: int) -> np.ndarray:
        """bool [grid * grid] (row-major) of interaction ``index`` as a history image: True where at least half of
        the token's patch shows a distractor (the renderer's own masks). All False in the image regime."""
        if (user_id, index) not in self._tokens:
            self.image(user_id, index)
        return self._tokens[(user_id, index)]

    def history_tokens(self, i: int) -> np.ndarray:
        """bool [H, grid * grid]: the distractor tokens of item i's history images."""
        w = self.windows[i]
        return np.stack([self.distractor_tokens(w.user_id, j) for j in range(w.start, w.start + self.history_len)])

    def token_noise_rate(self, indices: Sequence[int] | None = None) -> float:
        """Share of history tokens that are distractor tokens over the windows ``indices`` (default: all)."""
        idx = range(len(self)) if indices is None else indices
        return float(np.mean([self.history_tokens(int(i)).mean() for i in idx]))

    def images(self, i: int) -> dict[str, np.ndarray]:
        """uint8 images of item i: history [5, S, S, 3], reference and target [S, S, 3]."""
        w = self.windows[i]
        t = w.start + self.history_len
        return {"history": np.stack([self.image(w.user_id, j) for j in range(w.start, t)]),
                "reference": self.image(w.user_id, t, reference=True),
                "target": self.image(w.user_id, t, clean=True)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        i = i % len(self)
        w, im = self.windows[i], self.images(i)
        return {"history": to_model_images(im["history"]), "reference": to_model_images(im["reference"]),
                "target": to_model_images(im["target"]),
                "history_is_noise": torch.tensor(w.history_is_noise, dtype=torch.bool),
                "history_distractor_tokens": torch.from_numpy(self.history_tokens(i)),
                "user_id": torch.tensor(w.user_id), "start": torch.tensor(w.start), "instruction": w.instruction}


def make_datasets(n_users: int, seed: int = 0, noise_rates: float | Sequence[float] | None = None,
                  n_interactions: int = 12, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  **user_kw: Any) -> dict[str, PigeonDataset]:
    """Users, split by user, as {"train", "val", "test"} datasets (a split with no users is left out).

    ``noise_rates`` None: the regime's defaults; ``user_kw`` go to ``make_users`` (e.g. ``regime="token"``).
    """
    splits = split_users(make_users(n_users, seed, noise_rates, n_interactions, **user_kw), fractions, seed)
    return {k: PigeonDataset(v, seed) for k, v in splits.items() if v}


# ----------------------------------------------------------------------------- judging generated images


def taste_report(readings: Sequence[Mapping[str, Any]], windows: Sequence[Window],
                 anywhere: bool = False) -> dict[str, float]:
    """How well generated images follow the request and the taste, read by the attribute oracle.

    Args:
        readings: ``AttributeOracle.read`` outputs, one per generated image.
        windows: the windows the images were generated for.
        anywhere: judge the generated object wherever it stands (the first object the oracle finds, left to
            right; targets hold one object) instead of only in the target's slot (the reference's position).

    Returns:
        Fractions in [0, 1]: "shape" (the requested shape stands in the target's slot), "color" (its
        color is a favourite), "texture", "background", "taste" (color, texture and background all
        right) and "all" (taste and shape).
    """
    if len(readings) != len(windows) or not windows:
        raise ValueError(f"{len(readings)} readings for {len(windows)} windows; pass one reading per window")
    keys = ("shape", "color", "texture", "background", "taste", "all")
    hits = {k: 0 for k in keys}
    for r, w in zip(readings, windows):
        if anywhere:
            obj = next((r[p] for p in POSITIONS if r.get(p) is not None), None)
        else:
            obj = r.get(w.target.position)
        ok = {"shape": obj is not None and obj["shape"] == w.target.obj.shape,
              "color": obj is not None and obj["color"] in w.taste.colors,
              "texture": obj is not None and obj["texture"] == w.taste.texture,
              "background": r.get("background") == w.taste.background}
        ok["taste"] = ok["color"] and ok["texture"] and ok["background"]
        ok["all"] = ok["taste"] and ok["shape"]
        for k in keys:
            hits[k] += int(ok[k])
    return {k: hits[k] / len(windows) for k in keys}
