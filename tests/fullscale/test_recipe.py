"""The README's full-scale recipe, offline, on SD-1.5-architecture components with random weights under the real
Hub ids (steps and resolution made small; the unchanged recipe is for a GPU): `persviz train` x3, `persviz study`,
then `persviz notebooks --scale full` with PERSVIZ_CONCEPT: notebooks 00-03 execute, 04 is left out, exit 0."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from persviz.cli import main as cli_main
from persviz.concept_folder import read_concept
from persviz.run_notebooks import NOTEBOOKS_DIR

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def dog_concept(offline_sd15_cache, tmp_path_factory):
    """A concept folder trained with all three methods on the offline SD 1.5 (64 px, a few steps)."""
    root = tmp_path_factory.mktemp("recipe")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    out = root / "my_dog"
    common = ["--model", SD15, "--images", str(photos), "--class-word", "dog", "--placeholder", "<my-dog>",
              "--out", str(out), "--resolution", "64", "--no-progress"]
    cli_main(["train", "textual-inversion", *common, "--steps", "4", "--save-every", "2"])
    cli_main(["train", "dreambooth", *common, "--steps", "2", "--num-class-images", "2"])
    cli_main(["train", "custom-diffusion", *common, "--steps", "2"])
    return out


def test_train_makes_a_full_scale_concept_folder(dog_concept):
    concept = read_concept(dog_concept)
    assert concept.model == SD15 and set(concept.runs) == {"textual_inversion", "dreambooth", "custom_diffusion"}
    saved = json.loads((dog_concept / "textual_inversion" / "config.json").read_text())
    assert saved["lr"] == 5e-4 and saved["resolution_used"] == 64  # the paper's lr, the asked resolution
    assert json.loads((dog_concept / "custom_diffusion" / "config.json").read_text())["lr"] == 5e-6


def test_study_at_full_scale_has_no_oracle_columns(dog_concept):
    out = cli_main(["study", str(dog_concept), "--probes", "2", "--every", "2", "--steps", "2", "--no-progress"])
    assert out["judges"]["oracle"] is False
    assert all("oracle_context" not in row for row in out["tea_table"].values())
    assert {"clip_t_context", "clip_i", "dino_i"} <= set(out["tea_table"]["textual_inversion"])
    assert out["text"]["step"] == [2, 4]


def test_the_notebooks_run_at_full_scale(dog_concept, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSVIZ_CONCEPT", str(dog_concept))
    for key, value in {"PERSVIZ_STEPS": "2", "PERSVIZ_PROBES": "2", "PERSVIZ_BATCH_SIZE": "4",
                       "OMP_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(key, value)
    code = cli_main(["notebooks", "--scale", "full", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {r["notebook"]: (r["status"], r["error"]) for r in summary["runs"]}
    assert code == 0, status
    expected = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    assert sorted(status) == expected
    assert all(s == "ok" for n, (s, _) in status.items() if n != "04_pigeon"), status
    assert status["04_pigeon"][0] == "skipped" and "ShapesWorld only" in status["04_pigeon"][1]
    assert summary["models"][SD15] != "not in the local cache"
    unnamed = [f for r in summary["runs"] for f in r["unnamed"]]
    assert not unnamed, f"figures without a name (add figure=... to their cell's '# %%' line): {unnamed}"
    figures = {r["notebook"]: r["figures"] for r in summary["runs"]}
    assert "01_semantic_collapse/norm_histogram.png" in figures["01_semantic_collapse"]
