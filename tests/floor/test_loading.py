import subprocess
import sys

import pytest
import torch

from persviz import loading
from persviz.loading import SD15, ModelNotAvailableError, load_evaluator, load_pipeline


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(SD15)
    msg = str(info.value)
    assert SD15 in msg and "HF_HUB_OFFLINE=1" in msg and "hf download" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no stack of Hub internals


@pytest.mark.parametrize("model,kind", [("openai/clip-vit-large-patch14", "clip"), ("facebook/dinov2-base", "dino"),
                                        ("open_clip:ViT-L-14/openai", "clip")])
def test_evaluator_hub_ids_offline_give_a_clear_error(monkeypatch, model, kind):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="not in the local Hugging Face cache"):
        load_evaluator(model, kind=kind)


def test_a_folder_that_is_no_model_is_named(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="not a loadable model folder"):
        load_pipeline(tmp_path)


def test_scale_comes_from_one_environment_variable(monkeypatch):
    monkeypatch.delenv("PERSVIZ_SCALE", raising=False)
    assert not loading.full_scale() and loading.default_model("pipeline") == "shapesworld"
    monkeypatch.setenv("PERSVIZ_SCALE", "full")
    assert loading.default_model("pipeline") == SD15 and loading.default_model("clip") == loading.CLIP_L14
    monkeypatch.setenv("PERSVIZ_SCALE", "huge")
    with pytest.raises(ValueError, match="PERSVIZ_SCALE"):
        loading.full_scale()


def test_device_and_dtype_defaults():
    dev, dt = loading.pick_device()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    expected = (("cuda", torch.float16) if torch.cuda.is_available() else ("mps", torch.float32) if mps
                else ("cpu", torch.float32))
    assert (dev.type, dt) == expected
    assert loading.pick_device("cpu", torch.bfloat16) == (torch.device("cpu"), torch.bfloat16)


def test_bad_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        load_evaluator(kind="lpips")
    with pytest.raises(ValueError, match="ShapesWorld only"):
        load_evaluator("openai/clip-vit-large-patch14", kind="oracle")


def test_shipped_pipeline_is_a_plain_diffusers_folder():
    # the folder loads with diffusers alone, offline, in a fresh interpreter
    code = ("import torch; from diffusers import StableDiffusionPipeline; from persviz.paths import SHAPESWORLD_DIR;"
            "p = StableDiffusionPipeline.from_pretrained(SHAPESWORLD_DIR / 'sd'); p.set_progress_bar_config(disable=True);"
            "im = p('a red circle on a gray background', num_inference_steps=4, output_type='np').images;"
            "print(type(p).__name__, im.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                         "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "StableDiffusionPipeline (1, 32, 32, 3)" in out.stdout


def test_loaded_pipeline_passes_through(shapesworld_pipeline):
    pipe = shapesworld_pipeline
    assert load_pipeline(pipe) is pipe


def test_an_exported_full_scale_does_not_leak_into_the_loaders(monkeypatch):
    """The maintenance commands (world evaluate, FineXL train, Pigeon) call the loaders without a model: they get
    ShapesWorld's models even with PERSVIZ_SCALE=full exported; only the notebooks' setup and the command line's
    defaults read the scale."""
    monkeypatch.setenv("PERSVIZ_SCALE", "full")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = loading.load_pipeline()
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32  # the micro-SD, not SD 1.5
    assert load_evaluator(kind="clip").model.config.projection_dim == 128
    assert loading.default_model("pipeline") == SD15  # the defaults of setup and the command line do follow it
