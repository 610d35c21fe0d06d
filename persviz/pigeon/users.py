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

Everything is determined by ``seed``: user ``u`` is drawn from ``numpy.random.default_rng([seed, u])``
(adding users does not change earlier ones) and the image of interaction ``i`` is rendered with the
generator ``[seed, u, i, 0]`` (the same image in every window that contains it; its reference scene
with ``[seed, u, i, 1]``). Splits are by user.

Usage::

    users = make_users(200, seed=0, noise_rates=(0.0, 0.2, 0.4))
    splits = split_users(users, seed=0)             # {"train": [...], "val": [...], "test": [...]}
    train = PigeonDataset(splits["train"], seed=0)
    sample = train[0]   # history [5, 3, 32, 32], reference / target [3, 32, 32] in [-1, 1], instruction str
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from persviz.shapesworld.captions import concept_phrase
from persviz.shapesworld.render import render
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
        is_noise: per interaction, True for a noise image.
        references: per interaction, the reference scene used when it is a target (None for noise).
    """

    user_id: int
    taste: Taste
    noise_rate: float
    scenes: tuple[Scene, ...]
    is_noise: tuple[bool, ...]
    references: tuple[Scene | None, ...]

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


def liked_scene(taste: Taste, rng: np.random.Generator) -> Scene:
    """A single-object scene in the taste: varied shape, size and position; color from the favourites."""
    obj = Obj(SHAPES[rng.integers(len(SHAPES))], taste.colors[rng.integers(len(taste.colors))], taste.texture,
              SIZES[rng.integers(len(SIZES))])
    return Scene(obj, taste.background, POSITIONS[rng.integers(len(POSITIONS))])


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


def make_user(user_id: int, seed: int = 0, noise_rate: float = 0.2, n_interactions: int = 12,
              n_colors: Sequence[int] = (1, 2), history_len: int = HISTORY_LEN, p_second: float = 0.3) -> User:
    """One user, fully determined by (seed, user_id).

    Args:
        user_id: the user's index (>= 0).
        seed: data seed.
        noise_rate: fraction of noise images in every history; a multiple of 1/history_len in [0, 1].
        n_interactions: length of the interaction sequence; at least ``2 * history_len + 1`` so that
            every user has usable windows whatever its noise positions.
        n_colors: the possible numbers of favourite colors (drawn uniformly).
        history_len: history images per window.
        p_second: probability of a second object in a noise scene.
    """
    if isinstance(user_id, bool) or not isinstance(user_id, (int, np.integer)) or user_id < 0:
        raise ValueError(f"user_id must be an int >= 0; got {user_id!r}")
    if isinstance(history_len, bool) or not isinstance(history_len, (int, np.integer)) or history_len < 1:
        raise ValueError(f"history_len must be a positive int; got {history_len!r}")
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


def make_users(n_users: int, seed: int = 0, noise_rates: float | Sequence[float] = DEFAULT_NOISE_RATES,
               n_interactions: int = 12, n_colors: Sequence[int] = (1, 2), history_len: int = HISTORY_LEN,
               p_second: float = 0.3) -> list[User]:
    """``n_users`` users; user ``u`` gets ``noise_rates[u % len(noise_rates)]`` (a float: the same for all).

    See ``make_user`` for the other arguments.
    """
    if isinstance(n_users, bool) or not isinstance(n_users, (int, np.integer)) or n_users < 1:
        raise ValueError(f"n_users must be a positive int; got {n_users!r}")
    rates = (noise_rates,) if isinstance(noise_rates, numbers.Real) else tuple(noise_rates)
    if not rates:
        raise ValueError("noise_rates is empty; pass e.g. (0.0, 0.2, 0.4)")
    for r in rates:
        _check_noise_rate(r, history_len)
    return [make_user(u, seed, rates[u % len(rates)], n_interactions, n_colors, history_len, p_second)
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
                              instruction_for(target)))
    return out


class PigeonDataset(Dataset):
    """Sliding windows of ShapesWorld users as tensors.

    Item ``i`` is a dict: ``history`` float [5, 3, S, S], ``reference`` and ``target`` float [3, S, S]
    (all in [-1, 1]), ``history_is_noise`` bool [5], ``user_id`` and ``start`` long scalars and
    ``instruction`` (str; ``torch.utils.data.default_collate`` makes a list of them). ``window(i)``
    gives the ground-truth scenes. Images are rendered on first use and kept (uint8).

    Args:
        users: the users (e.g. one split of ``split_users``).
        seed: render seed (position jitter), the same as the users' data seed by convention.
        image_size: rendered size.
        history_len: history images per window.
        jitter: position jitter of the renderer.
    """

    def __init__(self, users: Sequence[User], seed: int = 0, image_size: int = IMAGE_SIZE,
                 history_len: int = HISTORY_LEN, jitter: float = 0.03) -> None:
        if not users:
            raise ValueError("users is empty; pass at least one User (make_users)")
        self.users = {u.user_id: u for u in users}
        self.seed, self.image_size, self.history_len, self.jitter = seed, image_size, history_len, jitter
        self.windows = windows_of(users, history_len)
        self._cache: dict[tuple[int, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def window(self, i: int) -> Window:
        """The ground truth of item i."""
        return self.windows[i]

    def image(self, user_id: int, index: int, reference: bool = False) -> np.ndarray:
        """uint8 [S, S, 3] of interaction ``index`` of a user (or of its reference scene)."""
        key = (user_id, index, int(reference))
        if key not in self._cache:
            u = self.users[user_id]
            scene = u.references[index] if reference else u.scenes[index]
            if scene is None:
                raise ValueError(f"interaction {index} of user {user_id} is a noise image and has no reference")
            rng = np.random.default_rng([self.seed, user_id, index, int(reference)])
            self._cache[key] = render(scene, size=self.image_size, rng=rng, jitter=self.jitter)
        return self._cache[key]

    def images(self, i: int) -> dict[str, np.ndarray]:
        """uint8 images of item i: history [5, S, S, 3], reference and target [S, S, 3]."""
        w = self.windows[i]
        t = w.start + self.history_len
        return {"history": np.stack([self.image(w.user_id, j) for j in range(w.start, t)]),
                "reference": self.image(w.user_id, t, reference=True), "target": self.image(w.user_id, t)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        i = i % len(self)
        w, im = self.windows[i], self.images(i)
        return {"history": to_model_images(im["history"]), "reference": to_model_images(im["reference"]),
                "target": to_model_images(im["target"]),
                "history_is_noise": torch.tensor(w.history_is_noise, dtype=torch.bool),
                "user_id": torch.tensor(w.user_id), "start": torch.tensor(w.start), "instruction": w.instruction}


def make_datasets(n_users: int, seed: int = 0, noise_rates: float | Sequence[float] = DEFAULT_NOISE_RATES,
                  n_interactions: int = 12, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  **user_kw: Any) -> dict[str, PigeonDataset]:
    """Users, split by user, as {"train", "val", "test"} datasets (a split with no users is left out)."""
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
