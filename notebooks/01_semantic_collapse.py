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
# # 01 · Semantic collapse: a learned token swallows its prompt
#
# Textual Inversion learns one embedding V* for a new token from a few images. The TEA paper (§3) shows that
# as training goes on V* drifts: **its norm grows and its direction leaves the class word c it started from**,
# and a prompt that holds V* collapses toward "a photo of V*": the rest of the prompt (the *context*) stops
# mattering. This notebook walks the paper's evidence on the embedded ShapesWorld micro-SD:
#
# 1. *existence in text space*: prompts with V* drift away from the same prompts with c and toward each other;
# 2. *root cause*: |V*| drifts into the tail of the vocabulary's norms;
# 3. *two-way impacts in image space*: concept fidelity up, context alignment down, judged by CLIP and by the
#    ShapesWorld oracle (ground truth);
# 4. *multi-concept*: of two learned tokens in one prompt, the more-trained one takes over.
#
# Each step is the paper's claim, tested here against ShapesWorld's ground truth. **On the embedded world the norm
# drift happens, but the collapse does not follow for Textual Inversion:** by the oracle the learned token draws
# its object without losing the context, while the micro CLIP reports a context loss (docs/findings.md: finding (i)
# holds, (ii) and (iii) fail for Textual Inversion; DreamBooth-LoRA and Custom Diffusion do lose context). The
# figures below print what each judge says, so read them as measurements, not illustrations.
#
# The Textual Inversion runs (3000 steps, a snapshot every 100) were trained by
# `persviz tea runs` and ship in the concept folders `data/shapesworld/concepts/<concept>/`; here we only read them.
#
# **Your own concept, on Stable Diffusion 1.5.** Train a concept folder with `persviz train textual-inversion
# --model stable-diffusion-v1-5/stable-diffusion-v1-5 --images DIR --class-word dog --placeholder '<my-dog>'
# --out CONCEPT_DIR`, then run with `PERSVIZ_SCALE=full` and these environment variables:
#
# | variable | what | default |
# |---|---|---|
# | `PERSVIZ_CONCEPT` | the concept folder (absolute path); a second one, comma-separated, for section 4 | required at full scale |
# | `PERSVIZ_STEPS` | sampler steps (DPM-Solver++) | 50, the paper's |
# | `PERSVIZ_GUIDANCE` | classifier-free guidance | 7, the paper's |
# | `PERSVIZ_BATCH_SIZE` | images per pipeline call | 8 |
# | `PERSVIZ_PROBES` | contextual prompts of the live study (the paper's CustomConcept101 prompts of the class, else the SD 1.5 set) | 8 |
#
# At full scale the text-space metrics use the SD 1.5 prompt sets, there is no oracle (its columns are
# ShapesWorld only), and section 4 needs two concepts.

# %%
# %matplotlib inline
import numpy as np
import torch
from IPython.display import display
from matplotlib.figure import Figure
from persviz.attention import attention_maps, content_words
from persviz.attention_plots import word_grid
from persviz.evaluation import difference_rows
from persviz.generation import generate
from persviz.plots import image_grid
from persviz.session import setup
from persviz.shapesworld.concepts import reference_signature
from persviz.tea.attention_study import ATTENTION_ROWS, att_size, read_attention_study, step_curve, study_differences
from persviz.tea.findings import dominance_title, trend_title
from persviz.tea.concept_study import (at_fractions, class_row, dominance, norm_panels, probe_label, probes_for,
                                       reference_grid, saved_study_rows, shift_sets, spaced_snapshots)
from persviz.tea.plots import dominance_plot, impact_curves, norm_histogram, norm_ratio_curve, shift_grid
from persviz.tea.study import generate_probes, impacts_over_steps, learned_embedding
from persviz.tea.tracker import to_shift_grid, track_semantic_shift
from persviz.tables import differences_text, table

sess = setup()  # PERSVIZ_SCALE=full switches to SD 1.5 (no oracle there); threads from OMP_NUM_THREADS
pipe, clip, dino, oracle = sess.pipe, sess.clip, sess.dino, sess.oracle
concepts, concept, other = sess.concepts(), sess.concept(), sess.second_concept()  # PERSVIZ_CONCEPT, or the shipped ones
gen = sess.generation()  # steps, guidance, batch_size
PH, CW, run = concept.placeholder, concept.class_word, concept.run_dir("textual_inversion")
print(sess, "| studied:", concept.folder)

# %% [markdown]
# ## The personal concepts
# Each concept is one specific object of the world: ⟨checkers⟩ a large yellow checkered square, ⟨candy⟩ a large
# pink striped circle, ⟨spark⟩ a large orange dotted triangle. The base model draws each when it is described in
# full, and never when given only its class word ("a square"), so learning it is real personalization; the oracle
# reads every attribute of it (shape, color, texture, size) on every render (docs/world.md). Its six reference
# images share a narrow context (one or two backgrounds), as a user's photos of their own object often do: that is
# what a collapsed token will copy.

# %% figure="reference_images"
images, width = reference_grid(concepts)
image_grid(images, len(concepts), width, row_labels=[f"{c.placeholder}\n({c.class_word})" for c in concepts],
           title="reference images of the three concepts" if len(concepts) == 3 else "reference images")

# %% [markdown]
# ## 1 · Existence in text space (Fig. 2)
# Take 200 contextual prompts with the class word, P_c ("a {} at the left next to a red circle"), the same
# prompts with V*, P_V*, and 200 simple prompts ("a photo of a {}"). Embed each through the text encoder (the
# 77 × D last hidden state, as the paper) at every 300th step (10 of the 30 saved snapshots; `persviz study`
# tracks every one) and measure the distance between the sets with four metrics. Collapse reads as: **inter-set
# distance d(P_V*, P_c) rises, the intra-set spread of P_V* falls, and P_V* moves toward the simple prompts**.

# %% figure="semantic_shift_over_steps"
track = track_semantic_shift(pipe, spaced_snapshots(run, 10), *shift_sets(concept), class_word=CW,
                             placeholder=PH)  # every 300th step of the concept
steps, grid = to_shift_grid(track)  # whose collapse is clearest on ShapesWorld (⟨candy⟩); the table below has all
shift_grid(steps, grid, title=f"semantic shift over Textual Inversion steps ({PH})")

# %%
first, last = f"step {track['step'][0]}", f"step {track['step'][-1]}"
table({k: {first: track[k][0], last: track[k][-1]} for k in (
    "inter_l2", "inter_hausdorff", "inter_mahalanobis", "inter_kl", "intra_vstar_l2", "intra_vstar_hausdorff",
    "intra_vstar_mahalanobis", "vs_simple_l2")}, index="distance", floats=".4f")

# %% [markdown]
# ## 2 · Root cause: the norm of V* (Fig. 4)
# The histogram shows the norm of every row of the input-embedding matrix; the marks are |V*| at saved steps.
# V* starts at the class word's norm and drifts to the tail. The paper's reading: there a single token outweighs
# the rest of the prompt in the encoder's attention (section 1 and 3 test whether it does here).

# %% figure="norm_histogram"
c_row = class_row(pipe, concept)  # SDXL: each text encoder's own class-word row
snaps = spaced_snapshots(run, 30, init=c_row)  # step 0 (the class word), then about 30 saved steps
five = at_fractions(snaps, (0, 1 / 6, 1 / 3, 2 / 3, 1))  # 0, 500, 1000, 2000, 3000 of a 3000-step run
panels = norm_panels(pipe, five, c_row)  # one per text encoder (SDXL: clip_l, clip_g), each its own vocabulary
fig = Figure(figsize=(6.4 * len(panels), 4.4))
for ax, (name, norms, marks, c_norm) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
    norm_histogram(norms, marks, class_norm=c_norm, ax=ax,
                   title=f"{name} norms of all vocabulary rows, |V*| marked".strip())
fig

# %% figure="norm_ratio_and_cosine_over_steps"
pres = [k[:-len("norm_ratio")] for k in track if k.endswith("norm_ratio")]  # SDXL: per encoder, clip_l_, clip_g_
fig = Figure(figsize=(6.4 * len(pres), 4.4))
for ax, pre in zip(fig.subplots(1, len(pres), squeeze=False)[0], pres):
    norm_ratio_curve(track["step"], track[pre + "norm_ratio"], track[pre + "cosine"], ax=ax,
                     title=f"{pre.rstrip('_')} |V*| / |c| and cos(V*, c) over steps".strip())
fig

# %% [markdown]
# ## 3 · Two-way impacts in image space (Fig. 3)
# Generate contextual prompts whose context the references never show ("a V* on a black background",
# "a V* at the left next to a blue circle on a white background") at several steps. CLIP-I (to the references)
# measures the concept; CLIP-T against the context text, and the oracle's reading of background, position and
# second object, measure the context. Here 8 prompts × 1 seed at five steps, computed live; the full-size
# numbers (24 prompts × 2 seeds, every 300 steps, all three concepts) were written by the training script and
# are read below.

# %% figure="context_vs_concept_over_steps"
probes, refs = probes_for(concept, sess.n_probes(8)), concept.reference_images()
sig = reference_signature(oracle, refs) if oracle is not None else None
live = impacts_over_steps(pipe, five, PH, CW, probes, refs, clip, dino, oracle, sig, **gen)
curves = {"CLIP-T context": live["clip_t_context"], "CLIP-I": live["clip_i"]}
if "oracle_context" in live:  # ShapesWorld only: the ground truth
    curves["oracle concept x100"] = 100 * np.array(live["oracle_concept"])
    curves["oracle context x100"] = 100 * np.array(live["oracle_context"])
impact_curves(live["step"], curves, title=trend_title(f"{PH} (live, {len(probes)} prompts)", live))

# %%
columns = {"concept": "concept", "step": "step", "clip_t_context": "CLIP-T ctx", "clip_i": "CLIP-I",
           "dino_i": "DINO-I", "oracle_context": "oracle ctx", "oracle_concept": "oracle concept"}
rows, title = saved_study_rows(concepts)  # first, middle and last saved step of each concept's run
shown = {k: v for k, v in columns.items() if rows and k in rows[0]}  # no oracle columns at full scale
(table(rows, shown, formats={k: ".2f" for k in ("clip_t_context", "clip_i", "oracle_context", "oracle_concept")
                             if k in shown}, title=title + sess.oracle_note) if rows else print(title))

# %% [markdown]
# What it looks like: the same prompts and seeds at the class word's embedding (step 0), early and late.

# %% figure="generations_over_steps"
show = at_fractions(snaps, (0, 1 / 3, 1))  # steps 0, 1000, 3000 of a 3000-step run
rows = []
for s, v in show:
    with learned_embedding(pipe, PH, v):
        rows.append(generate_probes(pipe, probes[:6], PH, **gen))
image_grid(np.concatenate(rows), len(show), len(probes[:6]), row_labels=[f"step {s}" for s, _ in show],
           col_labels=[probe_label(p) for p in probes[:6]], title=f"'a {PH} …' over training")

# %% [markdown]
# ## 4 · Multi-concept collapse (Fig. 5)
# Learn two concepts independently, then prompt both: "a ⟨spark⟩ next to a ⟨candy⟩". Hold ⟨spark⟩ at its
# final embedding and move ⟨candy⟩ along its training (⟨checkers⟩ sits out: a single token never learned it).
# CLIP-I of the images to each concept's anchor image shows whether the more-trained token takes the picture over
# (the paper's Fig. 5); the title says what happened here.

# %% figure="multi_concept_dominance"
if other is None:
    print("the multi-concept section needs two concepts: set PERSVIZ_CONCEPT=<concept folder>,<second concept "
          "folder> (each with a Textual Inversion run); skipped")
else:  # the second concept fixed at its final V*, the studied one along its run (steps 0, 100, ..., 3000)
    a, b = other.token("textual_inversion"), concept.token("textual_inversion")
    dom = dominance(pipe, other, concept, clip, (0, 1 / 30, 1 / 15, 1 / 10, 1 / 6, 1 / 3, 2 / 3, 1), **gen)
(dominance_plot(dom["step"], dom[f"clip_i_{a}"], dom[f"clip_i_{b}"], [f"{a} (fixed)", f"{b} (varied)"],
                title=dominance_title(dom["step"], dom[f"clip_i_{a}"], dom[f"clip_i_{b}"], a, b))
 if other is not None else None)

# %% [markdown]
# ## 5 · Where V* looks: cross-attention maps
# A collapsed V* should also take the *attention* the context words get. `persviz.attention.attention_maps` wraps
# every cross-attention processor of the pipeline (the image stays identical), recomputes softmax(QKᵀ/√d) and
# averages each word's map over heads, layers and sampler steps, as DAAM does. Below: one prompt at the class
# word's embedding (step 0), early and late, each word's map over its image (one colour scale per row).

# %% figure="attention_maps_over_steps"
prompt = probes[1]["template"].format(PH)  # a prompt with context words (a second object on ShapesWorld)
words = content_words(prompt)
runs = []
for s, v in show:
    with learned_embedding(pipe, PH, v), attention_maps(pipe, words) as m:
        runs.append((generate(pipe, [prompt], seed=0, **gen), m))
word_grid(np.concatenate([im for im, _ in runs]), {w: torch.cat([m.maps[w] for _, m in runs]) for w in words}, words,
          row_labels=[f"step {s}" for s, _ in show], title=prompt)

# %%
table({f"step {s}": {w: float(m.shares[w][0]) for w in words} | {"start token (of all)": float(m.special["start"][0])}
       for (s, _), (_, m) in zip(show, runs)}, index="share of the word-token attention", floats=".3f")

# %% [markdown]
# On ShapesWorld the ground truth says where the object and its context stand, so the maps can be *measured*:
# V*'s **leak** is the share of its attention outside the object's region (found from the generated image: the
# background colour is known, foreground pixels go to the slots the prompt names), the **context share** is the
# context words' part of the word-token attention. `persviz tea attention` measured both on the three concepts'
# shipped runs: 24 prompts × 2 seeds at every 300 steps, the class word's embedding (step 0) as the reference, with
# the evaluation protocol's 95 % intervals (prompts resampled, seeds nested).

# %% figure="attention_leak_and_shares_over_steps"
if oracle is None:
    print("the leak study needs ShapesWorld's ground truth (where each object stands); at full scale the maps and "
          "shares above are the measure")
else:
    att = read_attention_study()
    fig = Figure(figsize=(10, 3.1), layout="constrained")
    for ax, (metric, label) in zip(fig.subplots(1, 3), (("vstar_leak_excess", "V* leak − uniform map's"),
                                                         ("context_share", "context words' share"),
                                                         ("second_inside", "2nd object's words inside it"))):
        part = "two_object" if metric.startswith("second") else "all"
        c = step_curve(att, metric, part=part)
        ref = att[part]["intervals"]["textual_inversion step 0"][metric]
        impact_curves(c["step"], {label: c["mean"]}, bands={label: (c["low"], c["high"])}, ax=ax,
                      reference={label: ref["mean"]}, reference_bands={label: (ref["low"], ref["high"])},
                      ylabel="share", title=f"{label}\n(dotted: the class word)")
    display(fig)

# %%
if oracle is not None:
    diffs = study_differences(att, "textual_inversion step 0", "textual_inversion step 3000")
    table(difference_rows({m: d for m, d in diffs.items() if m in ATTENTION_ROWS}),
          title=f"V* at step 3000 minus the class word (step 0), {att_size(att)}")

# %% [markdown]
# **What the study says**, computed from `attention_study.json` (intervals 95 %, Holm across the measures): V*'s
# share of the word-token attention and the context words' share, the leak out of the object's region (raw and
# beyond a uniform map's), from the class word (step 0) to step 3000. On the micro-UNet the maps are coarse (8×8
# and 4×4 cells over a 32-pixel image): the measures per own resolution are in `attention_study.json`.

# %%
if oracle is not None:
    print(differences_text({"step 3000 minus the class word": {m: d for m, d in diffs.items() if m in ATTENTION_ROWS}}))

# %% [markdown]
# **Reading the figures.** Where the curves move as the paper reports, the mechanism is reproduced on a model
# that was trained from scratch on a toy world, with ground truth to confirm it; where they do not, the printed
# numbers say so. Notebook 02 fixes the collapse at test time.
