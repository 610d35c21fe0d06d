"""`persviz adopt dreambooth` on FLUX.1 (the offline FLUX.1-dev): a run of diffusers' train_dreambooth_lora_flux.py
(its pytorch_lora_weights.safetensors, transformer.* keys) and a kohya FLUX.1 LoRA (lora_unet_double_blocks_*) are
recorded in a concept folder and load through the method as diffusers' own load_lora_weights loads them, undone
exactly; LoRAs of the other denoiser, and a kohya LoRA of another width, are refused with a sentence."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from persviz.cli import main
from persviz.families import FAMILIES
from persviz.hub_models import FLUX_DEV, SD15
from persviz.loading import load_pipeline
from persviz.methods import get_method
from tests.helpers import photo_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = dict(prompt="a photo of a sks dog", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
           output_type="np")


def kohya_flux_lora(path, width=32, seed=0):
    """A kohya FLUX.1 LoRA (flux_train_network.py's names) on the double-stream blocks' attention projections."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        for name, out in (("img_attn_proj", width), ("txt_attn_proj", width), ("img_attn_qkv", 3 * width)):
            k = f"lora_unet_double_blocks_{i}_{name}"
            sd[k + ".lora_down.weight"] = torch.randn(4, width, generator=g) * 0.1
            sd[k + ".lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.1
            sd[k + ".alpha"] = torch.tensor(4.0)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    return path


def image(pipe):
    return pipe(**GEN, generator=torch.Generator().manual_seed(0)).images


def test_diffusers_and_kohya_flux_loras_are_adopted_and_load_as_diffusers_loads_them(offline_sd15_cache, tmp_path):
    pipe = load_pipeline(FLUX_DEV, device="cpu")
    m = get_method("dreambooth")
    cfg = m.recipe("sks", "dog", shapesworld=False, family=FAMILIES["flux"], steps=1, save_every=1, resolution=64,
                   batch_size=1)
    m.train(pipe, np.full((1, 64, 64, 3), 90, np.uint8), cfg, tmp_path / "trained")
    script_run = tmp_path / "flux-dreambooth-lora"  # what the script leaves: the LoRA file, no persviz config
    script_run.mkdir()
    shutil.copy(tmp_path / "trained" / "pytorch_lora_weights.safetensors", script_run)
    kohya_run = tmp_path / "kohya"
    kohya_run.mkdir()
    kohya_flux_lora(kohya_run / "my_flux_lora.safetensors")
    photos = photo_folder(tmp_path / "photos")
    plain = image(pipe)
    for run, source in ((script_run, "diffusers-flux"), (kohya_run, "kohya-flux")):
        out = tmp_path / f"concept-{source}"
        main(["adopt", "dreambooth", str(run), "--out", str(out), "--images", str(photos), "--class-word", "dog",
              "--model", FLUX_DEV])
        record = json.loads((out / "concept.json").read_text())["runs"]["dreambooth"]
        assert record["source"] == source and record["token"] == "sks" and record["folder"] == str(run)
        lora_file = next(run.glob("*.safetensors"))
        pipe.load_lora_weights(str(lora_file))  # the reference: diffusers' own loader
        theirs = image(pipe)
        pipe.unload_lora_weights()
        with m.loaded(pipe, run):
            mine = image(pipe)
        assert np.abs(mine - theirs).max() == 0.0 and np.abs(mine - plain).max() > 1e-6
        assert np.abs(image(pipe) - plain).max() == 0.0  # undone exactly


def test_loras_of_the_other_denoiser_or_width_are_refused_with_a_sentence(offline_sd15_cache, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    sd_run = tmp_path / "sd"
    sd_run.mkdir()
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(64, 4)},
              str(sd_run / "pytorch_lora_weights.safetensors"))
    flux_run = tmp_path / "flux"
    flux_run.mkdir()
    kohya_flux_lora(flux_run / "lora.safetensors")
    wide_run = tmp_path / "wide"
    wide_run.mkdir()
    kohya_flux_lora(wide_run / "lora.safetensors", width=64)
    cases = ((sd_run, FLUX_DEV, "is a UNet \\(SD 1.x\\) LoRA and the model is a FLUX.1 pipeline: it was trained on "
                                "another model"),
             (flux_run, SD15, "is a FLUX.1 LoRA \\(its keys hold double_blocks\\) but .* is a Stable Diffusion 1.x "
                              "pipeline: the LoRA was trained on another model family"),
             (wide_run, FLUX_DEV, "lora.safetensors does not fit the model's FLUX.1 transformer .*: it was trained on "
                                  "another model"))
    for run, model, why in cases:
        with pytest.raises(SystemExit, match=why):
            main(["adopt", "dreambooth", str(run), "--out", str(tmp_path / "c"), "--images", str(photos),
                  "--class-word", "dog", "--model", model])
        assert not (tmp_path / "c" / "concept.json").exists()
    ti_run = tmp_path / "ti"
    ti_run.mkdir()
    for step in (1, 2):  # diffusers' textual_inversion.py snapshots
        save_file({"<cat>": torch.ones(1, 32)}, str(ti_run / f"learned_embeds-steps-{step}.safetensors"))
    with pytest.raises(SystemExit, match="persviz adopts dreambooth runs trained on FLUX.1 so far, not "
                                         "textual_inversion \\(persviz reads, inspects and fixes Flux Textual"):
        main(["adopt", "textual-inversion", str(ti_run), "--out", str(tmp_path / "c"), "--images", str(photos),
              "--class-word", "dog", "--model", FLUX_DEV])
    assert not (tmp_path / "c" / "concept.json").exists()
