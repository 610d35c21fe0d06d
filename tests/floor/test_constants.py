"""persviz.constants, the names the command line shows before it runs anything: light, and its one copied list
agrees with the module that owns the objects."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from persviz import constants, methods
from persviz.shapesworld.concepts import CONCEPTS

ROOT = Path(__file__).resolve().parents[2]


def test_the_concept_names_are_the_shipped_concepts_in_order():
    assert constants.CONCEPT_NAMES == tuple(CONCEPTS)


def test_the_moved_constants_are_the_library_s_own():
    """The library modules read the same objects (moved, not copied)."""
    from persviz import generation, loading, trainers
    from persviz.pigeon import users
    from persviz.shapesworld import train
    from persviz.tea import attention_study
    assert trainers.METHODS is methods.METHODS and train.STAGES is constants.STAGES
    assert users.REGIMES is constants.REGIMES and attention_study.STUDY_JSON is constants.ATTENTION_STUDY_JSON
    assert generation.GUIDANCE == 4.0 and loading.SHAPESWORLD == "shapesworld" == constants.SCALES[0]


def test_importing_the_constants_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, persviz.constants; print('torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
