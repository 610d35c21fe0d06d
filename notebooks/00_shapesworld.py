# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · ShapesWorld: the embedded world
#
# persviz ships a tiny world of its own so that every notebook runs on a laptop CPU, offline, and still shows
# *trained* models doing real things. ShapesWorld is procedural: every image comes from a **scene** with known
# attributes (shape, color, texture, size, position, an optional second object, background), so every later
# result can be checked against ground truth.
#
# The shipped models use the very formats of the real ones: a `StableDiffusionPipeline` folder (CLIP tokenizer,
# CLIP text encoder, `AutoencoderKL`, `UNet2DConditionModel`, scheduler), a `transformers.CLIPModel`, a
# DINOv2-architecture encoder, and an attribute **oracle** that reads generated images.
#
# Set `PERSVIZ_SCALE=full` before starting Jupyter to run the model cells on Stable Diffusion 1.5 instead
# (GPU and Hub weights needed); the world itself is ShapesWorld either way.

# %%
# %matplotlib inline
import json
import numpy as np
from persviz import loading
from persviz.generation import generate
from persviz.paths import SHAPESWORLD_DIR
from persviz.plots import grouped_bars, image_grid
from persviz.session import setup
from persviz.shapesworld import Style, caption, render_batch, sample_scenes
from persviz.shapesworld.evaluate import clip_zero_shot, oracle_accuracy, sd_faithfulness
from persviz.tables import table

sess = setup(evaluators=("clip", "oracle"))  # the scale from PERSVIZ_SCALE; the oracle exists on ShapesWorld only
print(sess)

# %% [markdown]
# ## Scenes and captions
# A scene is drawn at random from the attribute lists; a small grammar captions it, from terse to full. The
# full caption has a **concept** part ("a small red striped circle") and a **context** part ("at the left next to
# a blue square on a beige background"), as the TEA paper splits its prompts.

# %% figure="random_scenes"
scenes = sample_scenes(12, seed=0)
image_grid(render_batch(scenes, size=64), 2, 6, title="twelve random scenes (64x64 renders; the models see 32x32)")

# %%
for s in scenes[:6]:
    print(f"{caption(s, level='terse'):22s} | {caption(s, level='full')}")

# %% [markdown]
# ## The renderer is a generator too
# Style knobs change *how* a scene is drawn while keeping *what* is drawn. A renderer with a style is a
# second, non-neural generator whose personalization is known exactly: FineXL's ground truth.

# %% figure="scenes_by_style"
styles = {"default": Style(), "warm": Style(warmth=0.8), "dark bg": Style(bg_darkness=0.8),
          "outline": Style(outline=1.5), "blur": Style(blur=1.0), "dense texture": Style(texture_density=1.6),
          "larger": Style(size_scale=1.25)}
few = sample_scenes(3, seed=5)
grid = np.concatenate([render_batch(few, style, size=64) for style in styles.values()])
image_grid(grid.reshape(len(styles), 3, 64, 64, 3).transpose(1, 0, 2, 3, 4).reshape(-1, 64, 64, 3), 3, len(styles),
           col_labels=list(styles), title="the same scenes under each style")

# %% [markdown]
# ## The models
# `setup()` (first cell) loaded them with `persviz.loading`: `load_pipeline()` gives the micro Stable Diffusion
# (or SD 1.5 at full scale), `load_evaluator()` the CLIP, the DINO-style encoder and the oracle. On ShapesWorld
# they load from the folders under `data/shapesworld/` with no network.

# %%
table({name: {"class": cls, "M parameters": n / 1e6} for name, (cls, n) in loading.describe(sess.pipe).items()},
      index="component", formats={"M parameters": ".2f"})

# %% [markdown]
# ## Prompt × seed
# Each row is one prompt, each column one seed (25 steps, or `PERSVIZ_STEPS`; guidance 4 on ShapesWorld, 7.5 on
# SD 1.5). Attributes named in the prompt are the ones the model must get right; the others are free.

# %% figure="prompt_by_seed"
prompts = (["a photo of a corgi on a beach", "a red car in the snow", "a watercolor painting of a cat"] if sess.full else
           ["a red circle on a gray background", "a blue striped square on a white background",
            "a yellow triangle on a navy background", "a green checkered diamond on a black background",
            "a small pink cross at the left next to a cyan circle on a beige background",
            "a large orange dotted circle in the center on a gray background"])
seeds = range(6)
guidance = sess.number("guidance", 7.5 if sess.full else 4.0, float)  # PERSVIZ_GUIDANCE overrides (full scale)
steps = sess.number("steps", 25)  # PERSVIZ_STEPS overrides (full scale)
images = np.concatenate([generate(sess.pipe, [p] * len(seeds), seed=0, guidance=guidance, steps=steps)
                         for p in prompts])  # image i: seed i
image_grid(images, len(prompts), len(seeds), row_labels=prompts, col_labels=[f"seed {s}" for s in seeds])

# %% [markdown]
# ## How well do the models read the world?
# The oracle is the judge of every experiment, so it is checked first against fresh renders; then the CLIP's
# zero-shot accuracy, and the micro-SD's faithfulness: does the oracle find, in the generated image, each
# attribute the prompt named? Here on small fresh samples; `MODEL_CARD.md` has the full measurement.

# %% figure="model_accuracy_per_attribute"
if not sess.full:
    live = {"oracle on renders": oracle_accuracy(sess.oracle, n=600, seed=99),
            "CLIP zero-shot": clip_zero_shot(sess.clip, n=400, seed=98)}
    faith = sd_faithfulness(sess.pipe, sess.oracle, n=60, seed=97)
    live["micro-SD faithfulness"] = {k: v for k, v in faith.items() if k != "counts"}
    display(grouped_bars(live, title="fresh samples in this run (dashed: 0.9)", target=0.9))

# %%
shipped = json.loads((SHAPESWORLD_DIR / "metrics.json").read_text())
table({k: shipped[k] for k in ("oracle_accuracy", "clip_zero_shot", "sd_faithfulness")},
      ["shape", "color", "texture", "size", "background", "second"], index="shipped measurement (MODEL_CARD.md)")
