"""Checks that a personal concept fits ShapesWorld: the oracle reads its recipe, the base micro-SD draws its
description, and its class word alone does not draw it (issue 23).

A concept's *recipe* is the attributes the oracle can read on one object: shape, color, texture, size. The oracle
*finds the concept* in an image when one object it reads carries every attribute of the recipe. Rates come with
two 95 % intervals: the nested bootstrap over prompts (seeds nested; persviz.stats) and Wilson's over images; the
lower of the two lower bounds is the one a target is checked against (``RateSummary.low``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from scipy.stats import norm

from persviz.generation import GUIDANCE, STEPS
from persviz.shapesworld.render import render
from persviz.shapesworld.scene import BACKGROUNDS, POSITIONS, SHAPES, Obj, Scene
from persviz.stats import bootstrap_mean
from persviz.trainers.core import Noising, latent_stats

RECIPE_KEYS = ("shape", "color", "texture", "size")
#: The 8 plain prompt templates of issue 23: three prefixes and the five backgrounds, no second object.
PLAIN_TEMPLATES = ("a photo of a {}", "an image of a {}", "a picture of a {}") + tuple(
    f"a {{}} on a {bg} background" for bg in BACKGROUNDS)


def recipe_attributes(obj: Obj) -> dict:
    """The oracle-readable recipe of a one-color object: {'shape', 'color', 'texture', 'size'}."""
    if obj.pattern_color is not None:
        raise ValueError("a two-color object (pattern_color set) has no recipe the oracle can read; the oracle knows "
                         "one-color objects whose pattern is a shade of the body color")
    return {k: getattr(obj, k) for k in RECIPE_KEYS}


def description(obj: Obj) -> str:
    """The words that describe an object in the caption grammar's order: 'large yellow checkered square'."""
    words = [obj.size, obj.color] + ([obj.texture] if obj.texture != "plain" else []) + [obj.shape]
    return " ".join(words)


def plain_prompts(word: str, templates: Sequence[str] = PLAIN_TEMPLATES) -> list[str]:
    """The plain prompts with `word` in the slot: 'a photo of a <candy>', 'a <candy> on a white background', ..."""
    return [t.format(word) for t in templates]


def finds(reading: dict, recipe: dict) -> bool:
    """Whether one object of an oracle reading carries every attribute of the recipe."""
    return any(o is not None and all(o[k] == v for k, v in recipe.items()) for o in (reading[p] for p in POSITIONS))


def found(oracle: Any, images: np.ndarray, recipe: dict) -> np.ndarray:
    """Per image, whether the oracle finds the concept: bool [N]."""
    return np.array([finds(r, recipe) for r in oracle.read(images)], dtype=bool)


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a rate k / n."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0; got k={k}, n={n}")
    z = float(norm.ppf((1 + level) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


@dataclass(frozen=True)
class RateSummary:
    """A rate over prompts x seeds with its nested bootstrap and Wilson intervals; `low` is the lower of the two."""

    rate: float
    k: int
    n: int
    n_prompts: int
    boot_low: float
    boot_high: float
    wilson_low: float
    wilson_high: float

    @property
    def low(self) -> float:
        return min(self.boot_low, self.wilson_low)

    def meets(self, rate: float, low: float) -> bool:
        """Whether the rate reaches `rate` and the lower bound reaches `low`."""
        return self.rate >= rate and self.low >= low

    def to_json(self) -> dict:
        return {**asdict(self), "low": self.low}

    def __str__(self) -> str:
        return (f"{self.rate:.3f} ({self.k}/{self.n}; bootstrap [{self.boot_low:.3f}, {self.boot_high:.3f}], "
                f"Wilson [{self.wilson_low:.3f}, {self.wilson_high:.3f}])")


def summarize_rate(hits: np.ndarray, n_boot: int = 10_000) -> RateSummary:
    """RateSummary of bool hits [prompts, seeds]."""
    hits = np.asarray(hits, dtype=np.float64)
    if hits.ndim != 2:
        raise ValueError(f"hits must be [prompts, seeds]; got shape {hits.shape}")
    iv = bootstrap_mean(hits, n_boot=n_boot)
    k, n = int(hits.sum()), int(hits.size)
    wl, wh = wilson(k, n)
    return RateSummary(float(hits.mean()), k, n, hits.shape[0], iv.low, iv.high, wl, wh)


@torch.no_grad()
def generate_grid(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int = STEPS,
                  guidance: float = GUIDANCE, batch_size: int = 64) -> np.ndarray:
    """Every prompt with every seed (the same seeds for each prompt): uint8 [P, S, H, W, 3]."""
    pairs = [(p, s) for p in prompts for s in seeds]
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for _, s in chunk]
        res = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="np").images
        out.append(np.clip(np.round(res * 255), 0, 255).astype(np.uint8))
    ims = np.concatenate(out)
    return ims.reshape(len(prompts), len(seeds), *ims.shape[1:])


def closest_object(reading: dict, recipe: dict) -> Optional[dict]:
    """The object of a reading that carries the most attributes of the recipe (the first slot on a tie; None when
    the oracle reads no object): what the oracle saw in place of the concept."""
    objs = [o for o in (reading[p] for p in POSITIONS) if o is not None]
    return max(objs, key=lambda o: sum(o[k] == v for k, v in recipe.items())) if objs else None


def prompt_readings(pipe: Any, oracle: Any, prompts: Sequence[str], seeds: Sequence[int],
                    **kwargs: Any) -> list[list[dict]]:
    """The oracle's readings of every prompt x seed image (generate_grid): [prompts][seeds]."""
    ims = generate_grid(pipe, prompts, seeds, **kwargs)
    p, s = ims.shape[:2]
    flat = oracle.read(ims.reshape(p * s, *ims.shape[2:]))
    return [flat[i * s:(i + 1) * s] for i in range(p)]


def prompt_hits(pipe: Any, oracle: Any, prompts: Sequence[str], seeds: Sequence[int], recipe: dict,
                **kwargs: Any) -> np.ndarray:
    """Whether the oracle finds the recipe in each generated image: bool [prompts, seeds]."""
    readings = prompt_readings(pipe, oracle, prompts, seeds, **kwargs)
    return np.array([[finds(r, recipe) for r in row] for row in readings], dtype=bool).reshape(len(prompts),
                                                                                               len(seeds))


def render_instances(obj: Obj, seeds: Sequence[int], second: bool = False) -> tuple[np.ndarray, list[str]]:
    """Renders of obj on every background and position, jittered by each seed; with `second`, beside a small
    plain object of another shape and color. Returns (uint8 [N, 32, 32, 3], the slot of obj in each image)."""
    other_shapes = [s for s in SHAPES if s != obj.shape]
    other_color = "blue" if obj.color != "blue" else "red"
    images, slots = [], []
    for s in seeds:
        rng = np.random.default_rng(int(s))
        for bg in BACKGROUNDS:
            for pos in (("left", "right") if second else POSITIONS):
                extra = Obj(other_shapes[int(s) % len(other_shapes)], other_color) if second else None
                images.append(render(Scene(obj, bg, pos, extra), rng=rng))
                slots.append(pos)
    return np.stack(images), slots


def oracle_accuracy(oracle: Any, obj: Obj, seeds: Sequence[int] = range(20), second: bool = False) -> dict:
    """The oracle's reading of rendered instances of obj, per recipe attribute and for the whole recipe:
    {attr: {'k', 'n', 'rate', 'wilson'}} with 'found' for every attribute together (read at obj's slot)."""
    recipe = recipe_attributes(obj)
    images, slots = render_instances(obj, seeds, second)
    readings = oracle.read(images)
    hits = {k: [] for k in (*RECIPE_KEYS, "found")}
    for r, slot in zip(readings, slots):
        o = r[slot]
        for k in RECIPE_KEYS:
            hits[k].append(o is not None and o[k] == recipe[k])
        hits["found"].append(o is not None and all(o[k] == recipe[k] for k in RECIPE_KEYS))
    out = {}
    for k, h in hits.items():
        n, c = len(h), int(sum(h))
        out[k] = {"k": c, "n": n, "rate": c / n, "wilson": list(wilson(c, n))}
    return out


def check_candidate(pipe: Any, oracle: Any, obj: Obj, seeds: Sequence[int],
                    templates: Sequence[str] = PLAIN_TEMPLATES, render_seeds: Optional[Sequence[int]] = None) -> dict:
    """The three checks of a candidate concept: the oracle on renders (alone, and beside a second object), the
    description drawn by the base model, and the class word alone (the control): {'oracle', 'oracle_with_second',
    'description_rate', 'class_word_rate', ...} (rates as RateSummary JSON)."""
    recipe = recipe_attributes(obj)
    desc = prompt_hits(pipe, oracle, plain_prompts(description(obj), templates), seeds, recipe)
    ctrl = prompt_hits(pipe, oracle, plain_prompts(obj.shape, templates), seeds, recipe)
    rs = render_seeds if render_seeds is not None else range(20)
    return {"recipe": recipe, "description": description(obj), "oracle": oracle_accuracy(oracle, obj, rs),
            "oracle_with_second": oracle_accuracy(oracle, obj, rs, second=True),
            "description_rate": summarize_rate(desc).to_json(), "class_word_rate": summarize_rate(ctrl).to_json(),
            "seeds": list(map(int, seeds)), "templates": list(templates)}


def screen_candidates(pipe: Any, oracle: Any, objs: Sequence[Obj], seeds: Sequence[int],
                      control_seeds: Sequence[int], templates: Sequence[str] = PLAIN_TEMPLATES,
                      progress: bool = False) -> list[dict]:
    """A quick screen of many candidates: each one's description rate (templates x seeds) and its class-word control
    rate (templates x control_seeds; the class word's images are generated once per shape and read for every
    candidate of that shape). One dict per candidate: description, recipe, 'description_rate', 'class_word_rate'."""
    control = {}
    for shape in dict.fromkeys(o.shape for o in objs):
        ims = generate_grid(pipe, plain_prompts(shape, templates), control_seeds)
        control[shape] = (oracle.read(ims.reshape(-1, *ims.shape[2:])), ims.shape[:2])
    out = []
    for i, obj in enumerate(objs):
        recipe = recipe_attributes(obj)
        hits = prompt_hits(pipe, oracle, plain_prompts(description(obj), templates), seeds, recipe)
        readings, shape2 = control[obj.shape]
        ctrl = np.array([finds(r, recipe) for r in readings]).reshape(shape2)
        out.append({"description": description(obj), "recipe": recipe,
                    "description_rate": summarize_rate(hits, n_boot=1000).to_json(),
                    "class_word_rate": summarize_rate(ctrl, n_boot=1000).to_json()})
        if progress:
            print(f"[{i + 1}/{len(objs)}] {description(obj)}: {hits.mean():.2f} (class word {ctrl.mean():.2f})",
                  flush=True)
    return out


@torch.no_grad()
def prompt_losses(pipe: Any, images: np.ndarray, prompts: Sequence[str], n_draws: int = 256,
                  seed: int = 0) -> np.ndarray:
    """The training objective of the images under each prompt (denoising MSE, as the trainers compute it), on the
    same draws of image, latent sample, noise and timestep for every prompt, so prompts compare pairwise:
    float64 [prompts, n_draws]."""
    device = pipe.unet.device
    mean, std = latent_stats(pipe.vae, np.asarray(images), False, device)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(mean), (n_draws,), generator=g)
    zt, t, target = Noising(pipe)(mean[idx], std[idx], g, device)
    out = []
    for prompt in prompts:
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        emb = pipe.text_encoder(ids)[0].expand(n_draws, -1, -1).to(pipe.unet.dtype)
        pred = pipe.unet(zt.to(pipe.unet.dtype), t, emb).sample.float()
        out.append(((pred - target) ** 2).mean(dim=(1, 2, 3)).double().cpu().numpy())
    return np.stack(out)


__all__ = ["PLAIN_TEMPLATES", "RECIPE_KEYS", "RateSummary", "check_candidate", "closest_object", "description",
           "finds", "found",
           "generate_grid", "oracle_accuracy", "plain_prompts", "prompt_hits", "prompt_losses", "prompt_readings", "recipe_attributes",
           "render_instances", "screen_candidates", "summarize_rate", "wilson"]
