"""The training command end to end in miniature, and exact resume after an interruption."""
import json

import numpy as np
import pytest
import torch

from persviz.cli import main as cli_main
from persviz.shapesworld import train


@pytest.fixture
def tmp_world(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(train, "SHAPESWORLD_DIR", tmp_path / "shapesworld")
    return tmp_path


def _run(steps, seed_fail_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = train.warmup_cosine(opt, 2, steps)
    calls = []

    def step(s):
        if s == seed_fail_at and not calls:
            calls.append(s)
            raise KeyboardInterrupt
        rng, g = train.step_rng(0, s)
        x = torch.from_numpy(rng.normal(size=(8, 4))).float()
        loss = (model(x) - torch.randn(8, 1, generator=g)).pow(2).mean()
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        return loss.item()

    train.run_loop("toy", steps, {"model": model, "opt": opt, "sched": sched}, step, save_every=2)
    return model


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_world):
    straight = _run(6)
    (train.CACHE / "toy.pt").unlink()
    with pytest.raises(KeyboardInterrupt):
        _run(6, seed_fail_at=3)
    assert torch.load(train.CACHE / "toy.pt")["step"] == 2  # the snapshot before the interruption
    resumed = _run(6)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_every_stage_runs_and_the_result_is_a_loadable_pipeline(tmp_world):
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


def test_unknown_stage_is_refused(tmp_world):
    with pytest.raises(SystemExit):
        cli_main(["shapesworld", "train", "--stages", "gan"])
