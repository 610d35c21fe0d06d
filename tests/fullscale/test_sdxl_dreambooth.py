"""DreamBooth-LoRA on SDXL (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48), through the Method protocol
with the family's recipe (diffusers' train_dreambooth_lora_sdxl.py defaults: the UNet's LoRA alone, text encoders
off, and on: both text encoders' attention LoRAs): only the adapters train, the UNet reads what StableDiffusionXLPipeline gives (encode_prompt's embeddings and
pooled output, _get_add_time_ids' time ids), a resumed run equals an uninterrupted one, the LoRA file loads with
diffusers' load_lora_weights and is undone exactly; prompt-level TEA on the result."""
import dataclasses

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.helpers import photo_folder
from persviz.families import assemble_pipeline, training_family, FAMILIES
from persviz.hub_models import SDXL_BASE
from persviz.methods import get_method
from persviz.tea import embeds_kwargs, encode_prompt_level
from persviz.trainers.core import RESUME_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DB = get_method("dreambooth")
INSTANCE = "a photo of a sks dog"  # the method's instance prompt for ('sks', 'dog')


@pytest.fixture(scope="module")
def sdxl(offline_sd15_cache):
    return assemble_pipeline(SDXL_BASE, device="cpu")


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 80, 96, 3), dtype=np.uint8)  # not square: the centre crop is 80 px


def config(steps, **kw):
    return DB.recipe("sks", "dog", False, family="sdxl", steps=steps, save_every=1, resolution=64, batch_size=1,
                     lr=1e-2, **kw)


def images(pipe, prompt="a photo of a sks dog on the grass"):
    return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_the_sdxl_recipe_is_train_dreambooth_lora_sdxl_pys_defaults():
    c = DB.recipe("sks", "dog", False, family="sdxl")
    assert (c.rank, c.lr, c.resolution, c.batch_size, c.train_text_encoder, c.prior_preservation) == (
        4, 1e-4, 1024, 4, False, False)
    assert (c.weight_decay, c.max_grad_norm, c.steps, c.class_guidance) == (1e-4, 1.0, 500, 5.0)
    assert c.instance_prompt == INSTANCE


def test_sdxl_trains_dreambooth_and_refuses_custom_diffusion_with_a_sentence(sdxl):
    assert training_family(sdxl, SDXL_BASE, DB) is FAMILIES["sdxl"]
    with pytest.raises(ValueError, match="persviz trains textual_inversion and dreambooth on Stable Diffusion XL so "
                       "far, not custom_diffusion") as info:
        training_family(sdxl, SDXL_BASE, get_method("custom_diffusion"))
    assert "\n" not in str(info.value)


def test_sdxl_dreambooth_trains_the_unets_lora_under_the_pipelines_conditioning(sdxl, photos, tmp_path):
    unet = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    te = [{k: v.clone() for k, v in m.state_dict().items()} for m in (sdxl.text_encoder, sdxl.text_encoder_2)]
    seen = []

    def look(module, args, kwargs):  # what the UNet reads at each training step
        seen.append((args[2].detach().clone(), {k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()}))

    handle = sdxl.unet.register_forward_pre_hook(look, with_kwargs=True)
    try:
        result = DB.train(sdxl, photos, config(3), tmp_path / "run", progress=False)
    finally:
        handle.remove()
    assert len(seen) == 3 and len(result.loss_history) == 3 and all(np.isfinite(result.loss_history))
    # the conditioning: diffusers' own encode_prompt and time ids (original 80x80, crop (0, 0), target 64x64)
    emb, _, pooled, _ = sdxl.encode_prompt(INSTANCE, device=torch.device("cpu"), do_classifier_free_guidance=False)
    time_ids = sdxl._get_add_time_ids((80, 80), (0, 0), (64, 64), dtype=emb.dtype,
                                      text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    for cond, added in seen:
        torch.testing.assert_close(cond, emb, rtol=0, atol=1e-6)
        torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=1e-6)
        torch.testing.assert_close(added["time_ids"], time_ids, rtol=0, atol=0)
    # the base weights and the pipeline are left as they were (Method.train does not load the result)
    assert all(torch.equal(unet[k], v) for k, v in sdxl.unet.state_dict().items())
    for m, before in zip((sdxl.text_encoder, sdxl.text_encoder_2), te):
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    run = tmp_path / "run"
    assert [k for k, _ in DB.snapshots(run)] == [1, 2, 3]
    weights = safetensors.torch.load_file(str(result.final_path))
    assert weights and all(k.startswith("unet.") for k in weights)  # the UNet's adapters only
    assert any(".attn2.to_k." in k for k in weights) and all(v.dtype == torch.float32 for v in weights.values())
    # loaded through the method (diffusers' load_lora_weights) it changes the image, and is undone exactly
    plain = images(sdxl)
    with DB.loaded(sdxl, run):
        tuned = images(sdxl)
        pe = encode_prompt_level(sdxl, "a photo of a sks dog on the grass", "a photo of a dog on the grass", 0.0, 0.0)
        same = sdxl(**embeds_kwargs(pe), num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
        np.testing.assert_array_equal(same, tuned)  # prompt-level TEA at rotation 0, scale 0: the same image
        adjusted = sdxl(**embeds_kwargs(encode_prompt_level(sdxl, "a photo of a sks dog on the grass",
                                                            "a photo of a dog on the grass")),
                        num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
        assert not np.array_equal(adjusted, tuned)
    assert not np.array_equal(tuned, plain)
    np.testing.assert_array_equal(images(sdxl), plain)


def test_a_resumed_sdxl_dreambooth_run_equals_an_uninterrupted_one(sdxl, photos, tmp_path):
    whole = DB.train(sdxl, photos, config(3), tmp_path / "whole", progress=False)
    part = DB.train(sdxl, photos, config(2), tmp_path / "part", progress=False)
    assert (tmp_path / "part" / RESUME_FILE).is_file()
    resumed = DB.train(sdxl, photos, config(3), tmp_path / "part", progress=False)
    assert resumed.loss_history == whole.loss_history and part.loss_history == whole.loss_history[:2]
    a, b = (safetensors.torch.load_file(str(r.final_path)) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_text_encoders_on_is_train_dreambooth_lora_sdxl_pys_train_text_encoder(sdxl, photos, tmp_path):
    """--train_text_encoder: LoRA on both encoders' q/k/v/out_proj (clip_l 32 wide, clip_g 48), a parameter group at
    --text_encoder_lr 5e-6 / --adam_weight_decay_text_encoder 1e-3; the UNet at each step reads what diffusers'
    encode_prompt gives with the adapters of the step before loaded by diffusers' load_lora_weights."""
    c = DB.recipe("sks", "dog", False, family="sdxl")
    assert (c.text_encoder_lr, c.text_weight_decay) == (5e-6, 1e-3)
    weights = {k: v.clone() for m in (sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2)
               for k, v in m.state_dict().items()}
    seen = []

    def look(module, args, kwargs):
        seen.append((args[2].detach().clone(), {k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()}))

    cfg = dataclasses.replace(config(2), train_text_encoder=True, text_encoder_lr=5e-3)
    handle = sdxl.unet.register_forward_pre_hook(look, with_kwargs=True)
    try:
        result = DB.train(sdxl, photos, cfg, tmp_path / "run", progress=False)
    finally:
        handle.remove()
    assert len(seen) == 2 and all(np.isfinite(result.loss_history))
    # only the adapters trained: the base weights are as before, the pipeline holds no LoRA
    after = {k: v for m in (sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2) for k, v in m.state_dict().items()}
    assert after.keys() == weights.keys() and all(torch.equal(weights[k], after[k]) for k in weights)
    saved = safetensors.torch.load_file(str(result.final_path))
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}
    for prefix, width in (("text_encoder", 32), ("text_encoder_2", 48)):
        downs = [v for k, v in saved.items() if k.startswith(prefix + ".") and "q_proj.lora" in k
                 and v.shape[0] == 4]
        assert downs and all(v.shape == (4, width) for v in downs)
        projections = {k.split("self_attn.")[1].split(".")[0] for k in saved if k.startswith(prefix + ".")}
        assert projections == {"q_proj", "k_proj", "v_proj", "out_proj"}
        ups = [v for k, v in saved.items() if k.startswith(prefix + ".") and v.shape[1] == 4]
        assert any(bool(v.abs().sum() > 0) for v in ups)  # B starts at 0: the text adapters trained
    # the optimizer's groups: the UNet's at lr / weight_decay, both text encoders' at their own
    state = torch.load(tmp_path / "run" / RESUME_FILE, weights_only=True)
    groups = [(g["lr"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]]
    assert groups == [(1e-2, 1e-4), (5e-3, 1e-3)]
    # step 2 read encode_prompt's embeddings and pooled output under checkpoint-1's adapters (diffusers' loader)
    sdxl.load_lora_weights(str(tmp_path / "run" / "checkpoint-1"))
    try:
        emb, _, pooled, _ = sdxl.encode_prompt(INSTANCE, device=torch.device("cpu"), do_classifier_free_guidance=False)
    finally:
        sdxl.unload_lora_weights()
    base, _, base_pooled, _ = sdxl.encode_prompt(INSTANCE, device=torch.device("cpu"), do_classifier_free_guidance=False)
    torch.testing.assert_close(seen[0][0], base, rtol=0, atol=1e-6)  # step 1: B = 0, the base encoders' states
    torch.testing.assert_close(seen[1][0], emb, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen[1][1]["text_embeds"], pooled, rtol=0, atol=1e-5)
    assert not torch.allclose(emb[..., :32], base[..., :32]) and not torch.allclose(emb[..., 32:], base[..., 32:])
    # loaded through the method both encoders' parts change, and it is undone exactly
    plain = images(sdxl)
    with DB.loaded(sdxl, tmp_path / "run"):
        tuned, _, _, _ = sdxl.encode_prompt(INSTANCE, device=torch.device("cpu"), do_classifier_free_guidance=False)
        assert not torch.allclose(tuned[..., :32], base[..., :32]) and not torch.allclose(tuned[..., 32:], base[..., 32:])
        assert not np.array_equal(images(sdxl), plain)
    np.testing.assert_array_equal(images(sdxl), plain)


def test_a_resumed_sdxl_run_with_the_text_encoders_on_equals_an_uninterrupted_one(sdxl, photos, tmp_path):
    def cfg(steps):
        return dataclasses.replace(config(steps), train_text_encoder=True, text_encoder_lr=5e-3)
    whole = DB.train(sdxl, photos, cfg(3), tmp_path / "whole", progress=False)
    part = DB.train(sdxl, photos, cfg(2), tmp_path / "part", progress=False)
    resumed = DB.train(sdxl, photos, cfg(3), tmp_path / "part", progress=False)
    assert resumed.loss_history == whole.loss_history and part.loss_history == whole.loss_history[:2]
    a, b = (safetensors.torch.load_file(str(r.final_path)) for r in (whole, resumed))
    assert any(k.startswith("text_encoder_2.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_persviz_train_takes_sdxl_for_dreambooth_with_the_sdxl_recipe(sdxl, tmp_path):
    import json

    from persviz.concept_folder import read_concept
    from persviz.trainers.concept_runs import train_concept
    folder = photo_folder(tmp_path / "photos")
    run = train_concept("dreambooth", folder, "dog", "sks", tmp_path / "concept", model=SDXL_BASE, pipe=sdxl, steps=1,
                        resolution=64, batch_size=1, progress=False)
    cfg = json.loads((run.run_dir / "config.json").read_text())
    assert (cfg["lr"], cfg["rank"], cfg["train_text_encoder"], cfg["prior_preservation"]) == (1e-4, 4, False, False)
    assert read_concept(tmp_path / "concept").model == SDXL_BASE
    from persviz.trainers.dreambooth_lora import has_lora
    assert not has_lora(sdxl.unet)  # the adapters are gone after training (load_result=False)


def test_persviz_train_turns_the_text_encoders_on_for_sdxl(offline_sd15_cache, tmp_path):
    from persviz.cli import main as cli_main
    folder = photo_folder(tmp_path / "photos")
    run = cli_main(["train", "dreambooth", "--model", SDXL_BASE, "--images", str(folder), "--class-word", "dog",
                    "--placeholder", "<d>", "--out", str(tmp_path / "concept"), "--steps", "1", "--resolution", "64",
                    "--batch-size", "1", "--text-encoders", "on", "--no-progress"])
    import json
    cfg = json.loads((run.run_dir / "config.json").read_text())
    assert (cfg["train_text_encoder"], cfg["text_encoder_lr"], cfg["text_weight_decay"]) == (True, 5e-6, 1e-3)
    keys = safetensors.torch.load_file(str(run.result.final_path))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
