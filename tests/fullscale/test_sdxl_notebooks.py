"""Notebooks 00-03 at full scale on an SDXL concept folder (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48):
the session loads the model concept.json names (the family from it, not SD 1.5), the generation defaults are the
SDXL family's, and every notebook runs; the norm histogram and |V*|/|c| figures are per text encoder."""
from __future__ import annotations

import json

import pytest

from tests.helpers import photo_folder
from persviz.cli import main as cli_main
from persviz.families import FAMILIES, family_of
from persviz.hub_models import SDXL_BASE
from persviz.run_notebooks import NOTEBOOKS_DIR
from persviz.session import setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xl_concept(offline_sd15_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("xl_notebooks")
    photos = photo_folder(root / "photos", n=3)
    common = ["--model", SDXL_BASE, "--images", str(photos), "--class-word", "dog", "--placeholder", "<xl-dog>",
              "--out", str(root / "xl_dog"), "--resolution", "64", "--batch-size", "1", "--no-progress"]
    cli_main(["train", "textual-inversion", *common, "--steps", "4", "--save-every", "2", "--lr", "0.05"])
    cli_main(["train", "dreambooth", *common, "--steps", "2", "--text-encoders", "on"])
    return root / "xl_dog"


def test_the_session_loads_the_concepts_model_and_its_familys_generation(xl_concept, monkeypatch):
    monkeypatch.setenv("PERSVIZ_CONCEPT", str(xl_concept))
    monkeypatch.delenv("PERSVIZ_STEPS", raising=False)
    monkeypatch.delenv("PERSVIZ_GUIDANCE", raising=False)
    monkeypatch.delenv("PERSVIZ_BATCH_SIZE", raising=False)
    sess = setup(evaluators=(), scale="full", threads=1)
    assert family_of(sess.pipe) is FAMILIES["sdxl"] and sess.pipeline_model() == SDXL_BASE
    assert sess.generation() == {"steps": 25, "guidance": 5.0, "batch_size": 4}  # the SDXL family's, not SD 1.5's


def test_the_notebooks_run_at_full_scale_on_an_sdxl_concept(xl_concept, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSVIZ_CONCEPT", str(xl_concept))
    for key, value in {"PERSVIZ_STEPS": "2", "PERSVIZ_PROBES": "2", "PERSVIZ_BATCH_SIZE": "4",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    code = cli_main(["notebooks", "--scale", "full", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {r["notebook"]: (r["status"], r["error"]) for r in summary["runs"]}
    assert sorted(status) == sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb"))
    # Known gap, open (docs/families.md, docs/pick.md §7.5): notebook 05's picker reads one text encoder, so on SDXL
    # it stops with the sentence below. This asserts the gap as it is, so the test fails the day 05 runs on SDXL and
    # this line must become "ok" like the others.
    assert status["05_which_step_which_fix"][0] == "failed" and "2 text encoders (clip_l, clip_g)" in \
        status["05_which_step_which_fix"][1], status
    assert code == 1, status
    assert all(s == "ok" for n, (s, _) in status.items() if n not in ("04_pigeon", "05_which_step_which_fix")), status
    assert summary["models"][SDXL_BASE] != "not in the local cache"
    executed = json.loads((tmp_path / "out" / "02_test_time_embedding_adjustment.ipynb").read_text())
    texts = [o.get("text", "") for c in executed["cells"] for o in c.get("outputs", [])]
    printed = "".join(t if isinstance(t, str) else "".join(t) for t in texts)
    assert "clip_l V*" in printed and "clip_g V*" in printed  # the adjustment of one vector, per encoder
    figures = {r["notebook"]: r["figures"] for r in summary["runs"]}
    assert "01_semantic_collapse/norm_histogram.png" in figures["01_semantic_collapse"]
