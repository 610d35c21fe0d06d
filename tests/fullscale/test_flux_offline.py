"""FLUX.1-dev and FLUX.1-schnell under their real Hub ids in the offline cache (persviz.families.flux.write_test_cache:
random weights, clip_l 32 wide and T5 48, a T5 tokenizer trained offline): loaded by persviz as diffusers' own
FluxPipeline loads them, the family found from the pipeline, each model's settings read from its transformer, images
as diffusers' pipeline makes them; the dtype on a GPU, the CPU-offload flag, and a missing Flux naming its gated
repository and `hf download` line."""
import numpy as np
import pytest
import torch

from persviz.families import FAMILIES, assemble_pipeline, family_of, index_family, text_stack
from persviz.families.base import UnsupportedModelError
from persviz.hub_models import FLUX_DEV, FLUX_SCHNELL, SD15, SDXL_BASE, download_command
from persviz.loading import ModelNotAvailableError, load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("hub_id", [FLUX_DEV, FLUX_SCHNELL])
def test_flux_loads_offline_as_diffusers_loads_it(offline_sd15_cache, hub_id):
    from diffusers import FluxPipeline
    pipe = load_pipeline(hub_id, device="cpu")
    ref = FluxPipeline.from_pretrained(offline_sd15_cache["snapshots"][hub_id], dtype=torch.float32)
    assert type(pipe) is FluxPipeline and family_of(pipe) is FAMILIES["flux"]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert [(e.name, e.width) for e in text_stack(pipe)] == [("clip_l", 32), ("t5", 48)]
    assert text_stack(pipe).by_name("t5").tokenizer is pipe.tokenizer_2
    settings = FAMILIES["flux"].pipeline_generation(pipe)
    dev = hub_id == FLUX_DEV
    assert pipe.transformer.config.guidance_embeds is dev  # the guidance-distilled model takes guidance as input
    assert (settings["steps"], settings["guidance"], settings["max_sequence_length"]) == ((28, 3.5, 512) if dev else
                                                                                          (4, 0.0, 256))
    assert pipe.scheduler.config.use_dynamic_shifting is dev


def test_the_assembler_prepares_flux_and_it_generates_as_diffusers_does(offline_sd15_cache):
    from diffusers import FluxPipeline
    pipe = assemble_pipeline(FLUX_DEV, device="cpu")
    assert pipe.vae.use_slicing and pipe.dtype == torch.float32  # the CPU: float32
    ref = FluxPipeline.from_pretrained(offline_sd15_cache["snapshots"][FLUX_DEV], dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a dog", num_inference_steps=2, guidance_scale=3.5, height=64, width=64,
              max_sequence_length=32, output_type="np")
    mine = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    theirs = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    assert mine.shape == (1, 64, 64, 3) and np.isfinite(mine).all()
    np.testing.assert_allclose(mine, theirs, atol=1e-5)
    other = ref(**{**kw, "prompt": "a photo of a cat"}, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(other - theirs).max() > 1e-3  # the prompt reaches the image: the comparison can fail


def test_on_a_gpu_flux_loads_in_bfloat16_and_sd_in_float16(offline_sd15_cache, monkeypatch):
    import persviz.loading
    asked = []
    real = persviz.loading.load_pipeline

    def recording(model, device=None, dtype=None):
        asked.append(dtype)
        return real(model, device="cpu", dtype=torch.float32)
    monkeypatch.setattr(persviz.loading, "load_pipeline", recording)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert index_family(FLUX_DEV) is FAMILIES["flux"] and index_family(SDXL_BASE) is FAMILIES["sdxl"]
    assemble_pipeline(FLUX_DEV)
    assemble_pipeline(FLUX_SCHNELL, device="cuda")
    assemble_pipeline(SD15, device="cuda")
    assemble_pipeline(FLUX_DEV, device="cpu")
    assert asked == [torch.bfloat16, torch.bfloat16, torch.float16, None]  # None: pick_device's float32 on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="the sentence of a machine without a GPU")
def test_cpu_offload_without_a_gpu_is_refused_with_a_sentence(offline_sd15_cache, monkeypatch, capsys):
    sentence = ("--cpu-offload moves each model of the pipeline to a CUDA GPU while it runs, and this machine has "
                "none; leave --cpu-offload out")
    with pytest.raises(UnsupportedModelError, match=sentence):
        assemble_pipeline(FLUX_DEV, cpu_offload=True)
    import os

    from persviz.cli import main
    monkeypatch.setenv("PERSVIZ_CPU_OFFLOAD", "0")  # restored after the test: main sets it for the command
    assert main(["doctor", "--cpu-offload"]) == 0  # the flag anywhere on the line, for every command
    assert os.environ["PERSVIZ_CPU_OFFLOAD"] == "1"
    with pytest.raises(UnsupportedModelError, match="this machine has none; leave --cpu-offload out"):
        assemble_pipeline(FLUX_DEV)  # cpu_offload=None: the command line's flag
    capsys.readouterr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs a CUDA GPU")
def test_cpu_offload_on_a_gpu_gives_the_pipelines_images(offline_sd15_cache):
    plain = assemble_pipeline(FLUX_DEV, device="cuda")
    offloaded = assemble_pipeline(FLUX_DEV, cpu_offload=True)
    assert plain.dtype == torch.bfloat16 and offloaded.transformer.device.type == "cpu"
    kw = dict(prompt="a photo of a dog", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
              output_type="np")
    a = plain(**kw, generator=torch.Generator().manual_seed(0)).images
    b = offloaded(**kw, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("hub_id,gated", [(FLUX_DEV, True), (FLUX_SCHNELL, False)])
def test_a_missing_flux_names_its_repository_and_download_line(empty_hub_cache, hub_id, gated):
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(hub_id, device="cpu")
    msg = str(info.value)
    assert hub_id in msg and download_command(hub_id) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "--include 'tokenizer_2/*'" in msg
    assert "--include 'transformer/diffusion_pytorch_model*.safetensors*'" in msg
    assert "flux1-dev.safetensors" not in download_command(hub_id) and "ae.safetensors" not in download_command(hub_id)
    gate = (f"{hub_id} is a gated repository: accept its license on https://huggingface.co/{hub_id} and log in with "
            "`hf auth login` first")
    assert (gate in msg) is gated


def test_the_other_families_refuse_a_flux_pipeline_and_flux_refuses_theirs(offline_sd15_cache):
    flux = load_pipeline(FLUX_SCHNELL, device="cpu")
    sdxl = load_pipeline(SDXL_BASE, device="cpu")
    assert FAMILIES["sdxl"].refusal(flux, FLUX_SCHNELL) == (
        f"{FLUX_SCHNELL} (FluxPipeline) has a T5 text encoder and a transformer, not clip_g and a UNet, so it is not "
        f"an SDXL pipeline; use {SDXL_BASE} or a model fine-tuned from it")
    assert FAMILIES["sd1"].refusal(flux, FLUX_SCHNELL).startswith(
        f"{FLUX_SCHNELL} (FluxPipeline) is a diffusion transformer, not a Stable Diffusion 1.x pipeline")
    assert FAMILIES["flux"].refusal(sdxl, SDXL_BASE) == (
        f"{SDXL_BASE} (StableDiffusionXLPipeline) has no T5 text encoder and transformer, so it is not a FLUX.1 "
        f"pipeline (clip_l + t5 and a joint-attention transformer); use {FLUX_DEV} or {FLUX_SCHNELL}")
    assert family_of(sdxl) is FAMILIES["sdxl"] and family_of(flux) is FAMILIES["flux"]
