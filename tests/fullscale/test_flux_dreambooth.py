"""DreamBooth-LoRA on the FLUX.1 transformer (persviz.trainers.dreambooth_lora_flux) on the offline FLUX.1-dev: the
recipe is train_dreambooth_lora_flux.py's defaults; the conditioning is FluxPipeline.encode_prompt's; the first step's
loss is the script's flow-matching loss written out here with diffusers' own packing and the scheduler's sigma looked
up by timestep (as its get_sigmas); only the adapters train; a resumed run equals an uninterrupted one bit for bit;
the LoRA loads through the method and is undone exactly; prompt-level TEA at 0, 0 gives the LoRA's image; the
command line trains with the recipe."""
import numpy as np
import pytest
import torch

from persviz.families import FAMILIES
from persviz.hub_models import FLUX_DEV
from persviz.loading import load_pipeline
from persviz.methods import get_method
from persviz.seeding import step_rng
from persviz.tea.pipeline import embeds_kwargs, encode_prompt_level
from persviz.trainers.dreambooth_lora_flux import FLUX_TARGETS, TRAIN_GUIDANCE, flux_condition
from tests.helpers import photo_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = dict(num_inference_steps=2, height=64, width=64, max_sequence_length=32, output_type="np")


def images():
    rng = np.random.default_rng(0)
    return (rng.random((2, 64, 64, 3)) * 255).astype(np.uint8)


def config(**kw):
    return get_method("dreambooth").recipe("sks", "dog", shapesworld=False, family=FAMILIES["flux"],
                                           **{"steps": 2, "save_every": 1, "resolution": 64, "batch_size": 1, **kw})


def test_the_flux_recipe_is_train_dreambooth_lora_flux_defaults():
    settings = FAMILIES["flux"].recipe_settings(get_method("dreambooth"))
    assert settings == {"lr": 1e-4, "rank": 4, "resolution": 512, "batch_size": 4, "save_every": 500, "steps": 500,
                        "train_text_encoder": False, "prior_preservation": False, "prior_loss_weight": 1.0,
                        "num_class_images": 100, "class_batch_size": 4, "class_steps": 28, "class_guidance": 3.5,
                        "weight_decay": 1e-4, "max_grad_norm": 1.0, "flip_p": 0.0}
    assert TRAIN_GUIDANCE == 3.5 and len(FLUX_TARGETS) == 12


def test_the_first_step_is_the_scripts_flow_matching_loss_and_only_the_adapters_train(offline_sd15_cache, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    pipe = load_pipeline(FLUX_DEV, device="cpu")
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg = config()
    family, stack = FAMILIES["flux"], FAMILIES["flux"].text_stack(pipe)
    with torch.no_grad():
        cond, pooled = flux_condition(family, stack, [cfg.instance_prompt])
        ref_cond, ref_pooled, _ = pipe.encode_prompt(cfg.instance_prompt, None, max_sequence_length=32)
    assert torch.equal(cond, ref_cond) and torch.equal(pooled, ref_pooled)
    # step 0 written out: at step 0 the LoRA's B is 0, so the transformer is the base one
    rng, g = step_rng(cfg.seed, 0)
    i = int(rng.integers(2, size=1)[0])
    x_img = torch.from_numpy(images()[i:i + 1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        post = pipe.vae.encode(x_img).latent_dist
        eps = torch.randn(post.mean.shape, generator=g)
        noise = torch.randn(post.mean.shape, generator=g)
        u = torch.rand(1, generator=g)
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(offline_sd15_cache["snapshots"][FLUX_DEV],
                                                                subfolder="scheduler")
        t = sched.timesteps[(u * 1000).long()]
        sigma = sched.sigmas[(sched.timesteps == t).nonzero().item()]  # the script's get_sigmas
        x = (post.mean + post.std * eps - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        zt = (1 - sigma) * x + sigma * noise
        packed = FluxPipeline._pack_latents(zt, 1, 4, 8, 8)
        img_ids = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        pred = pipe.transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.tensor([3.5]),
                                pooled_projections=ref_pooled, encoder_hidden_states=ref_cond,
                                txt_ids=torch.zeros(32, 3), img_ids=img_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, 64, 64, 8)
        expected = float(((pred - (noise - x)) ** 2).mean())
    result = get_method("dreambooth").train(pipe, images(), cfg, tmp_path / "run")
    assert result.loss_history[0] == pytest.approx(expected, rel=1e-5)
    assert len(result.loss_history) == 2 and result.loss_history[1] != result.loss_history[0]
    after = pipe.transformer.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)  # adapters only
    from safetensors.torch import load_file
    lora = load_file(str(result.final_path))
    assert lora and all(k.startswith("transformer.") for k in lora)
    kinds = {k.split(".lora")[0].split(".", 3)[-1] for k in lora if "transformer_blocks.0." in k}
    assert kinds == set(FLUX_TARGETS)  # every default target of the script, in the double-stream block
    assert [p.parent.name for p in result.snapshot_paths] == ["checkpoint-1", "checkpoint-2"]


def test_a_resumed_run_equals_an_uninterrupted_one_and_the_lora_loads_and_unloads(offline_sd15_cache, tmp_path):
    pipe = load_pipeline(FLUX_DEV, device="cpu")
    m = get_method("dreambooth")
    whole = m.train(pipe, images(), config(steps=3), tmp_path / "whole")
    m.train(pipe, images(), config(steps=1), tmp_path / "parts")
    resumed = m.train(pipe, images(), config(steps=3), tmp_path / "parts")
    assert resumed.loss_history == whole.loss_history
    from safetensors.torch import load_file
    a, b = load_file(str(whole.final_path)), load_file(str(resumed.final_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = pipe(prompt="a photo of a sks dog", generator=torch.Generator().manual_seed(0), **GEN).images
    with m.loaded(pipe, tmp_path / "whole"):
        lora = pipe(prompt="a photo of a sks dog", generator=torch.Generator().manual_seed(0), **GEN).images
        embeds = encode_prompt_level(pipe, "a photo of a sks dog", "a photo of a dog", 0.0, 0.0, placeholder="sks")
        tea0 = pipe(**embeds_kwargs(embeds), generator=torch.Generator().manual_seed(0), **GEN).images
    back = pipe(prompt="a photo of a sks dog", generator=torch.Generator().manual_seed(0), **GEN).images
    assert np.abs(lora - plain).max() > 1e-6  # the LoRA reaches the image
    assert np.abs(tea0 - lora).max() == 0.0  # prompt-level TEA at 0, 0 on the LoRA pipeline: the LoRA's image
    assert np.abs(back - plain).max() == 0.0  # undone exactly


def test_persviz_train_dreambooth_on_flux_with_the_recipe(offline_sd15_cache, tmp_path):
    import dataclasses
    import json

    from persviz.cli import main
    photos = photo_folder(tmp_path / "photos")
    main(["train", "dreambooth", "--model", FLUX_DEV, "--images", str(photos), "--class-word", "dog", "--placeholder",
          "<my-dog>", "--out", str(tmp_path / "concept"), "--steps", "1", "--resolution", "64", "--batch-size", "1"])
    run = tmp_path / "concept" / "dreambooth"
    record = json.loads((run / "config.json").read_text())
    assert (run / "pytorch_lora_weights.safetensors").is_file() and record["denoiser"] == "transformer"
    assert (record["lr"], record["rank"], record["weight_decay"], record["save_every"], record["guidance"]) == \
        (1e-4, 4, 1e-4, 500, 3.5)
    with pytest.raises(ValueError, match="persviz trains DreamBooth-LoRA on the FLUX.1 transformer only so far"):
        get_method("dreambooth").train(load_pipeline(FLUX_DEV, device="cpu"), images(),
                                       dataclasses.replace(config(), train_text_encoder=True), tmp_path / "te")


def test_a_flux_lora_against_an_sd_pipeline_is_refused_with_a_sentence(tmp_path):
    from safetensors.torch import save_file

    from persviz.trainers.dreambooth_lora import load_dreambooth_lora
    from persviz.weight_files import lora_layout
    from tests.helpers import make_tiny_sd_pipeline
    keys = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(32, 4)}
    save_file(keys, str(tmp_path / "flux_lora.safetensors"))
    assert lora_layout(keys) == "diffusers-flux" and lora_layout(["unet.a.lora_A.weight"]) == "diffusers"
    with pytest.raises(ValueError, match="is a FLUX.1 LoRA \\(its keys hold transformer_transformer_blocks\\) "
                                         "but .* is a Stable Diffusion 1.x pipeline: the LoRA was trained on another "
                                         "model family"):
        load_dreambooth_lora(make_tiny_sd_pipeline(), tmp_path / "flux_lora.safetensors")
