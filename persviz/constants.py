"""The names and numbers the command line shows before it runs anything, owned here so that building its parser
(``persviz --help``) imports no torch: this module imports only ``persviz.paths`` (standard library).

The library modules that use them import them from here (``persviz.shapesworld.train.STAGES``,
``persviz.pigeon.users.REGIMES`` ... stay where they were, as the same objects). ``CONCEPT_NAMES`` is the one copy: the keys of ``persviz.shapesworld.concepts.CONCEPTS``, in order
(tests/floor/test_constants.py checks that they agree).
"""
from __future__ import annotations

from persviz.paths import DATA_DIR, SHAPESWORLD_DIR

# ----------------------------------------------------------------------------- scale (persviz.loading, the notebooks)
SHAPESWORLD = "shapesworld"  # the embedded default model name
SCALE_ENV = "PERSVIZ_SCALE"
SCALES = (SHAPESWORLD, "full")
CPU_OFFLOAD_ENV = "PERSVIZ_CPU_OFFLOAD"  # 1: the pipeline's models wait on the CPU, each moved to the GPU in turn

# ----------------------------------------------------------------------------- methods
#: The methods' names are the registry's (persviz.methods, light too: it imports no torch); not repeated here.

# ----------------------------------------------------------------------------- generation (persviz.generation)
GUIDANCE = 4.0  # classifier-free guidance of ShapesWorld's micro-SD

# ----------------------------------------------------------------------------- ShapesWorld (persviz.shapesworld)
#: The stages of `persviz shapesworld train`, in the order they run (persviz.shapesworld.train).
STAGES = ("tokenizer", "clip", "vae", "vae_decoder", "oracle", "dino", "unet", "pipeline")
TRAIN_SIZE = 100_000  # rendered training images
CONCEPT_NAMES = ("checkers", "candy", "spark")  # the shipped personal concepts (persviz.shapesworld.concepts)
CONCEPTS_DIR = SHAPESWORLD_DIR / "concepts"

# ----------------------------------------------------------------------------- TEA (persviz.tea.attention_study)
ATTENTION_STUDY_JSON = CONCEPTS_DIR / "attention_study.json"
CLASS_WORD_ROW = "class word"  # the tea table's row of the base model prompted with the class word alone
ATTENTION_STEP_EVERY = 300  # Textual Inversion steps between the attention study's snapshots

# ----------------------------------------------------------------------------- FineXL (persviz.finexl)
#: Bootstrap draws over probe prompts (each draw reruns every decomposition; 10,000 would take ten times as long).
N_BOOT_BENCH = 1000
FINEXL_CACHE_DIR = DATA_DIR / "cache" / "finexl"
EXPLAIN_CHUNK = 8  # prompts per cell of `persviz finexl explain` (persviz.finexl.model_pair.CHUNK)

# ----------------------------------------------------------------------------- Pigeon (persviz.pigeon.users)
#: Noise regimes: "image" (whole noise images; the default and the shipped results), "token" (every history
#: image shows a liked object beside distractor objects; ``noise_rate`` is the share of distractor tokens) and
#: "decoy" (as "token", but every distractor of a user carries one decoy style, a color and a texture outside the
#: taste: a rival taste that copying the distractors would follow).
REGIMES = ("image", "token", "decoy")
#: The regimes whose noise is distractor tokens inside liked images (per-token ground truth).
TOKEN_REGIMES = ("token", "decoy")
