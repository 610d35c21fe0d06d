"""`persviz adopt`: another tool's run folder registered in a concept folder through the command line (on the
ShapesWorld micro-SD, text width 128), and bad runs ending the command with the reason and nothing written. The
run folders are written as the tools write them (see tests/floor/test_foreign_runs.py for the sources)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from persviz.cli import main as cli_main
from persviz.concept_folder import read_concept
from persviz.shapesworld.concepts import CONCEPTS_DIR
from tests.floor.test_foreign_runs import a1111_ti_run, diffusers_ti_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WIDTH = 128  # the ShapesWorld text encoder's


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(CONCEPTS_DIR / "checkers" / "images", folder)
    return folder


def adopt(method, run, out, photos, *extra):
    return cli_main(["adopt", method, str(run), "--out", str(out), "--images", str(photos), "--model", "shapesworld",
                     *extra])


def test_adopt_a_diffusers_textual_inversion_run(tmp_path, photos, capsys):
    run = diffusers_ti_run(tmp_path / "other_tool" / "ti", token="<chk>", width=WIDTH)
    out = tmp_path / "checkers"
    concept = adopt("textual-inversion", run, out, photos, "--class-word", "square")
    assert "diffusers run" in capsys.readouterr().out
    saved = json.loads((out / "concept.json").read_text())
    assert saved["runs"] == {"textual_inversion": {"folder": str(run.resolve()), "token": "<chk>",
                                                   "source": "diffusers"}}
    assert (saved["placeholder"], saved["class_word"], saved["model"]) == ("<chk>", "square", "shapesworld")
    assert concept.reference_images().shape[0] == len(list(photos.iterdir()))
    assert not (out / "textual_inversion").exists()  # recorded where it is, not copied
    assert read_concept(out).run_dir("textual_inversion") == run.resolve()


def test_adopt_an_a1111_run_and_what_an_existing_concept_folder_refuses(tmp_path, photos):
    out = tmp_path / "c"
    adopt("ti", diffusers_ti_run(tmp_path / "ti", token="<chk>", width=WIDTH), out, photos, "--class-word", "square")
    run = a1111_ti_run(tmp_path / "a1111" / "chk", name="chk")
    for k in (5, 10):  # the A1111 snapshots at the micro-SD's width
        f = run / "embeddings" / f"chk-{k}.pt"
        d = torch.load(f, weights_only=True)
        d["string_to_param"]["*"] = torch.randn(1, WIDTH)
        torch.save(d, f)
    with pytest.raises(SystemExit, match="already has a textual_inversion run"):
        adopt("ti", run, out, photos)
    with pytest.raises(SystemExit, match="class word 'square', not 'circle'"):
        adopt("ti", run, tmp_path / "c", photos, "--class-word", "circle")
    concept = adopt("ti", run, tmp_path / "d", photos, "--class-word", "square")
    assert concept.runs["textual_inversion"] == {"folder": str(run.resolve()), "token": "chk", "source": "a1111"}


@pytest.mark.parametrize("method, make, message", [
    ("ti", lambda p: diffusers_ti_run(p, width=32), "trained on another model"),
    ("custom-diffusion", lambda p: p.mkdir() or p, "looked for pytorch_custom_diffusion_weights"),
    ("ti", lambda p: diffusers_ti_run(p, width=WIDTH), "pass --class-word"),
    ("ti", lambda p: diffusers_ti_run(p, width=WIDTH), "stored under '<cat-toy>', not '<x>'"),
])
def test_bad_runs_end_the_command_with_nothing_written(tmp_path, photos, method, make, message):
    run = make(tmp_path / "run")
    extra = ["--class-word", "square"] if message != "pass --class-word" else []
    extra += ["--token", "<x>"] if "stored under" in message else []
    out = tmp_path / "concept"
    with pytest.raises(SystemExit, match=message):
        adopt(method, run, out, photos, *extra)
    assert not out.exists()


def test_custom_diffusion_without_its_token_file_asks_for_token(tmp_path, photos):
    run = tmp_path / "cd"
    run.mkdir()
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight":
               torch.zeros(8, WIDTH)}, str(run / "pytorch_custom_diffusion_weights.safetensors"))
    with pytest.raises(SystemExit, match="pass --token"):
        adopt("custom-diffusion", run, tmp_path / "concept", photos, "--class-word", "square")
    assert not (tmp_path / "concept").exists()
