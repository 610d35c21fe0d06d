"""The door: the `persviz` command line (persviz.cli) end to end in miniature, one section per subcommand."""
import json
import math

import numpy as np
import pytest

from persviz.cli import main as cli_main
from persviz.pigeon import study as st
from persviz.pigeon.model import WEIGHTS_FILE, load_weights, tiny_pipeline
from persviz.pigeon.train import TrainConfig, evaluate
from persviz.pigeon.users import PigeonDataset, make_users
from persviz.shapesworld import train


# ----------------------------------------------------------------------------- persviz shapesworld train


def test_every_stage_runs_and_the_result_is_a_loadable_pipeline(shapesworld_train_in_tmp):
    tmp_world = shapesworld_train_in_tmp
    from diffusers import StableDiffusionPipeline
    cli_main(["shapesworld", "train", "--train-size", "300", "--oracle-size", "200", "--clip-steps", "2", "--vae-steps", "2", "--vae-decoder-steps", "2",
                "--oracle-steps", "2", "--dino-steps", "2", "--unet-steps", "2"])
    out = tmp_world / "shapesworld"
    for rel in train.DONE.values():
        assert (out / rel).exists(), rel
    pipe = StableDiffusionPipeline.from_pretrained(out / "sd")
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert json.loads((train.CACHE / "last_run.json").read_text())["unet_steps"] == 2
    # a second call skips finished stages (no snapshot is rewritten)
    before = (train.CACHE / "unet.pt").stat().st_mtime_ns
    cli_main(["shapesworld", "train", "--train-size", "300", "--unet-steps", "2"])
    assert (train.CACHE / "unet.pt").stat().st_mtime_ns == before


@pytest.mark.usefixtures("shapesworld_train_in_tmp")
def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        cli_main(["shapesworld", "train", "--stages", "gan"])


# ----------------------------------------------------------------------------- persviz pigeon train / study


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers, numpy 2
def test_command_line_and_evaluate(tmp_path) -> None:
    r = cli_main(["pigeon", "train", "--tiny", "--stage", "1", "--steps", "2", "--batch-size", "2", "--n-users", "10", "--save-every", "1",
              "--out", str(tmp_path / "stage1"), "--no-progress"])
    assert r.steps == 2 and all(math.isfinite(x) for x in r.losses)
    assert (tmp_path / "stage1" / WEIGHTS_FILE).is_file()
    pipe = tiny_pipeline(seed=0, d_model=32)
    load_weights(pipe.model, tmp_path / "stage1")

    class StubOracle:
        def read(self, x):
            return [{"background": "gray", "center": None} for _ in range(len(x))]

    ds = PigeonDataset(make_users(3, seed=0), seed=0)
    rep = evaluate(pipe, ds, 2, StubOracle(), batch_size=2, num_inference_steps=2)
    assert sum(rep["ratio_counts"].values()) == 2 and set(rep["per_ratio"]) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert set(rep["selected"]) == {"shape", "color", "texture", "background", "taste", "all"}
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(stage=2)
    with pytest.raises(ValueError, match="beta"):
        TrainConfig(beta=0.0)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers, numpy 2
def test_command_line_passes_its_settings(monkeypatch, tmp_path, capsys) -> None:
    seen = {}
    # the stage rows of comparison_table carry "vs_no_mask" (paired differences), which the command prints
    diff = {"mean": -0.5, "low": -1.0, "high": 0.1, "p": 0.2, "p_holm": 0.4, "n_prompts": 3, "n_images": 3,
            "level": 0.95}
    monkeypatch.setattr(st, "comparison_table", lambda *a, **kw: seen.update(args=a, kw=kw) or [
        {"noise_rate": 0.2, "row": "history without masks", "key": "no_mask", "n": 3, "clip_i": 1.5},
        {"noise_rate": 0.2, "row": "Pigeon stage 1", "key": "stage1", "n": 3, "clip_i": 1.0,
         "vs_no_mask": {"clip_i": diff}}])
    cli_main(["pigeon", "study", "--stage1", "s1", "--stage2", "none", "--n-windows", "3", "--noise-rates", "0.2,0.6",
             "--out", str(tmp_path / "c.json")])
    assert seen["args"] == ("s1", None, 3, (0.2, 0.6), "test")
    assert seen["kw"]["path"] == str(tmp_path / "c.json") and seen["kw"]["num_inference_steps"] == 25
    out = capsys.readouterr().out
    assert "minus history without masks" in out and "-0.50 [-1.00, +0.10] p=0.2 (Holm 0.4)" in out


def test_the_console_script_exits_0_after_a_command_that_returns_an_object(tmp_path):
    """`persviz train` returns a ConceptRun to Python callers; the console script must still exit 0."""
    import shutil
    import subprocess
    import sys

    from persviz.shapesworld.concepts import CONCEPTS_DIR
    shutil.copytree(CONCEPTS_DIR / "checkers" / "images", tmp_path / "photos")
    cmd = [sys.executable, "-m", "persviz", "train", "ti", "--images", str(tmp_path / "photos"), "--class-word",
           "square", "--placeholder", "<c>", "--out", str(tmp_path / "c"), "--steps", "1", "--no-progress",
           "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "textual_inversion: 1 steps" in done.stdout
