"""SDXL base under its real Hub id in the offline cache (persviz.families.sdxl.write_test_cache: random weights,
clip_l 32 wide and clip_g 48): loaded by persviz as diffusers' own StableDiffusionXLPipeline loads it, prepared by
its family, and generating at 64 px; a missing SDXL names its `hf download` line."""
import numpy as np
import pytest
import torch

from persviz.families import FAMILIES, assemble_pipeline, family_of, text_stack
from persviz.hub_models import SDXL_BASE, download_command
from persviz.loading import ModelNotAvailableError, load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sdxl_loads_offline_as_diffusers_loads_it(offline_sd15_cache):
    from diffusers import StableDiffusionXLPipeline
    pipe = load_pipeline(SDXL_BASE, device="cpu")
    ref = StableDiffusionXLPipeline.from_pretrained(offline_sd15_cache["snapshots"][SDXL_BASE], dtype=torch.float32)
    assert type(pipe) is StableDiffusionXLPipeline and family_of(pipe) is FAMILIES["sdxl"]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert [(e.name, e.width) for e in text_stack(pipe)] == [("clip_l", 32), ("clip_g", 48)]
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer("a dog").input_ids == pipe.tokenizer_2("a dog").input_ids  # the same CLIP BPE


def test_the_assembler_prepares_sdxl_and_it_generates_as_diffusers_does(offline_sd15_cache):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    pipe = assemble_pipeline(SDXL_BASE, device="cpu")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.vae.use_slicing
    ref = StableDiffusionXLPipeline.from_pretrained(offline_sd15_cache["snapshots"][SDXL_BASE], dtype=torch.float32)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)  # textual_inversion_sdxl.py's
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a dog", num_inference_steps=2, output_type="np")
    mine = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    theirs = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    assert mine.shape == (1, 64, 64, 3) and np.isfinite(mine).all()
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_a_missing_sdxl_names_its_download_line(empty_hub_cache):
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(SDXL_BASE, device="cpu")
    msg = str(info.value)
    assert SDXL_BASE in msg and download_command(SDXL_BASE) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "--include 'tokenizer_2/*'" in msg and "text_encoder_2/model.safetensors" in msg
