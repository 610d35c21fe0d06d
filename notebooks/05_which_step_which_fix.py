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
# # 05 · Which step, and which fix
#
# The question users of every personalization tool ask most: **which checkpoint should I keep?** A loss curve
# does not say, and a sample grid is hard to read. persviz answers it with what it measures at every checkpoint:
# identity (does the image show *my* concept?) against context (does it show the rest of the prompt?), on one fixed
# set of prompts and seeds, with intervals — then a recommendation by **one rule, written down before any run**
# (docs/pick.md §2):
#
# > the earliest step whose identity is within the interval of the best step's, and whose context interval does
# > not lie wholly below step 0's (the base model with the class word).
#
# On ShapesWorld two judges read every image: CLIP (what a user has) and the attribute oracle (the ground truth).
# Then the second question: **which test-time fix** (TEA at the token or prompt level, a norm-only rescale,
# adaptive TEA) brings the context back, at what cost in identity?
#
# The numbers below are read from the shipped results (`data/shapesworld/pick/`, written by `persviz pick`,
# `persviz repair` and `python -m persviz.tea.early_warning`); regenerating them takes about an hour on 2 cores.
#
# **Your own concept at full scale** (`PERSVIZ_SCALE=full`, `PERSVIZ_CONCEPT=CONCEPT_DIR`): run
# `persviz pick CONCEPT_DIR` and `persviz repair CONCEPT_DIR` first (a GPU; CLIP-T of the context part is the
# context judge there, there is no oracle); this notebook then reads `CONCEPT_DIR/pick/pick.json` and
# `CONCEPT_DIR/repair/repair.json`.

# %%
# %matplotlib inline
import json
from pathlib import Path

from IPython.display import display
from persviz.paths import DATA_DIR
from persviz.session import setup
from persviz.shapesworld.concepts import LEARNED_BY
from persviz.tables import table
from persviz.tea.early_warning import read_result
from persviz.tea.pick import (early_warning_plot, fast_pick, fast_text, pick_rows, read_pick, recommended_strips,
                              tradeoff_figure)
from persviz.tea.repair import pooled, tradeoff_plot

sess = setup()
pipe, concept = sess.pipe, sess.concept()
shapesworld = sess.oracle is not None
SHIPPED = DATA_DIR / "shapesworld" / "pick"
where = SHIPPED / concept.name if shapesworld else Path(concept.folder)
print(sess, "| studied:", concept.folder, "| results:", where)
has_result = shapesworld or (where / "pick" / "pick.json").is_file()
result = read_pick(where) if has_result else {"methods": {}}  # full scale: run `persviz pick CONCEPT_DIR` first
if not has_result:
    print(f"no pick result in {where}; run `persviz pick {where}` for the sections that read it")

# %% [markdown]
# ## The trade-off, checkpoint by checkpoint
# One point per checkpoint (colour: the training step), its 95 % interval as a cross, the Pareto front in red, the
# rule's recommendation ringed. Left: CLIP's reading; right: the oracle's (ShapesWorld only).

# %% figure="tradeoff_textual_inversion"
tradeoff_figure(result["methods"]["textual_inversion"]) if "textual_inversion" in result["methods"] else None

# %% figure="tradeoff_dreambooth"
tradeoff_figure(result["methods"]["dreambooth"]) if "dreambooth" in result["methods"] else None

# %% figure="tradeoff_custom_diffusion"
tradeoff_figure(result["methods"]["custom_diffusion"]) if "custom_diffusion" in result["methods"] else None

# %% [markdown]
# ## Every shipped run: does CLIP's pick land on the oracle's front?
# The oracle's front is the set of checkpoints no other checkpoint beats on both the oracle's identity and its
# context. A CLIP-based pick that lies on it is one the ground truth would not overrule.

# %%
if shapesworld:
    picks = {name: read_pick(SHIPPED / name) for name in ("checkers", "candy", "spark")}
    rows = pick_rows(picks)
    for r in rows:
        r["learned"] = r["method"] in LEARNED_BY[r["concept"]]
    display(table(rows, title="the rule's pick by each judge (docs/pick.md §2)"))
    on = [r["CLIP pick on oracle front"] for r in rows]
    print(f"CLIP's pick lies on the oracle's front in {sum(on)} of {len(on)} runs")

# %% [markdown]
# ## The recommended step beside the last
# The first probes (backgrounds and second objects the references never show) at the recommended checkpoint and at
# the last, the same seeds.

# %% figure="strips_recommended_vs_last"
recommended_strips(pipe, concept, result["methods"]["textual_inversion"], sess.generation()) \
    if "textual_inversion" in result["methods"] else None

# %% [markdown]
# ## Early warning: does the text-space signal see collapse coming?
# The signal costs no image: |V*| leaving the vocabulary's 95th percentile of row norms (the flag
# `persviz inspect` raises). Registered test (docs/pick.md §4): over 20 Textual Inversion runs (4 learning rates
# × 5 seeds, 400 steps, a snapshot every 50), the rank correlation of the step the signal predicts with the
# collapse step (the first step whose oracle context interval lies wholly below step 0's), with a bootstrap
# interval. "None" means the event did not happen within the run.

# %% figure="early_warning"
warning = read_result()
if warning and warning.get("runs"):
    c, v = warning.get("correlation"), warning.get("verdict")
    print(f"{warning['done']} of {warning['planned']} runs; "
          + (f"rho = {c['rho']:.3f} [{c['low']:.3f}, {c['high']:.3f}]; " if c and c["rho"] is not None and c["rho"] == c["rho"]
         else "rho undefined (the predicted step is the same in every run); ")
          + (f"{'predicts' if v['predicts'] else 'does not predict'}: {v['why']}" if v else ""))
early_warning_plot(warning) if warning and warning.get("runs") else None

# %% [markdown]
# `persviz pick --fast` reads only that signal. It recommends a step only when the experiment above says the
# signal predicts collapse, and otherwise says so.

# %%
print(fast_text(fast_pick(concept.folder, pipe, ["textual_inversion"], warning=warning)))

# %% [markdown]
# ## Which fix: every fix on the same prompts and seeds, against no fix
# `persviz repair` sweeps each fix's knob on the runs that learned their concept and scores every image; below,
# the paired differences against no fix pooled over those runs (each run's probes are units), and each judge's
# ranking (context difference + identity difference at each fix's best knob). AdaptSP is left out: its method
# section could not be read (docs/pick.md §5).

# %%
reps = [json.loads(p.read_text()) for p in sorted(SHIPPED.glob("*/repair/repair.json"))] if shapesworld else \
    [json.loads((where / "repair" / "repair.json").read_text())] if (where / "repair" / "repair.json").is_file() else []
pool = pooled(reps, oracle=shapesworld) if reps else None
if pool:
    for judge, ranking in pool["ranking"].items():
        display(table(ranking, title=f"fixes ranked by {judge}"))

# %% figure="fixes_by_the_oracle"
tradeoff_plot(pool["differences"], "oracle", title="fixes against no fix: the oracle") if pool and shapesworld else None

# %% figure="fixes_by_clip"
tradeoff_plot(pool["differences"], "clip", title="fixes against no fix: CLIP") if pool else None
