"""Textual Inversion on SDXL (the offline reduced-width SDXL: clip_l 32 wide, clip_g 48): one row per encoder,
written as {"clip_l", "clip_g"} (the layout kohya, A1111/Forge, ComfyUI and diffusers' pivotal tuning read), only
the placeholder's rows change, a resumed run equals an uninterrupted one, and the conditioning the rows train under
is the one StableDiffusionXLPipeline.encode_prompt gives once the token is loaded."""
import json

import numpy as np
import pytest
import safetensors
import torch

from tests.helpers import photo_folder
from persviz.embedding_files import TOKEN_METADATA, read_embedding_file
from persviz.families import FAMILIES, UnsupportedModelError, assemble_pipeline, text_stack, training_family
from persviz.hub_models import SDXL_BASE
from persviz.methods import get_method
from persviz.trainers.core import RESUME_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TI = get_method("ti")


@pytest.fixture(scope="module")
def sdxl(offline_sd15_cache):
    return assemble_pipeline(SDXL_BASE, device="cpu")


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 80, 96, 3), dtype=np.uint8)  # not square: the centre crop is 80


def config(steps, **kw):
    return TI.recipe("<v>", "dog", False, family="sdxl", steps=steps, save_every=1, resolution=64, batch_size=1, **kw)


def state(pipe):
    return [(len(e.tokenizer), e.encoder.config.vocab_size, e.rows.detach().clone()) for e in text_stack(pipe)]


def test_sdxl_textual_inversion_learns_a_row_per_encoder_and_only_those(sdxl, photos, tmp_path):
    before = state(sdxl)
    unet = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    result = TI.train(sdxl, photos, config(3), tmp_path / "run", progress=False)
    after = state(sdxl)
    for (n0, v0, w0), (n1, v1, w1) in zip(before, after):  # the pipeline is left as it was
        assert (n0, v0) == (n1, v1) and torch.equal(w0, w1)
    assert all(torch.equal(unet[k], v) for k, v in sdxl.unet.state_dict().items())
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("learned_embeds*")) == [
        "learned_embeds-steps-1.safetensors", "learned_embeds-steps-2.safetensors",
        "learned_embeds-steps-3.safetensors", "learned_embeds.safetensors"]
    with safetensors.safe_open(str(result.final_path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata()[TOKEN_METADATA] == "<v>"
        parts = {k: f.get_tensor(k) for k in f.keys()}
    assert parts["clip_l"].shape == (1, 32) and parts["clip_g"].shape == (1, 48)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in parts.values())
    for e in text_stack(sdxl):  # each row moved from its own encoder's class-word row
        init = e.word_row("dog").float()
        assert not torch.equal(parts[e.name][0], init)
        assert (parts[e.name][0] - init).norm() < 0.1 * init.norm() + 1.0
    read = read_embedding_file(result.final_path)
    assert (read.format, read.token, read.per_encoder) == ("sdxl", "<v>", True)
    assert [k for k, _ in TI.snapshots(run)] == [1, 2, 3] and len(result.loss_history) == 3


def test_a_resumed_sdxl_run_equals_an_uninterrupted_one(sdxl, photos, tmp_path):
    whole = TI.train(sdxl, photos, config(3), tmp_path / "whole", progress=False)
    part = TI.train(sdxl, photos, config(2), tmp_path / "part", progress=False)
    assert (tmp_path / "part" / RESUME_FILE).is_file()
    resumed = TI.train(sdxl, photos, config(3), tmp_path / "part", progress=False)
    assert resumed.loss_history == whole.loss_history and part.loss_history == whole.loss_history[:2]
    a, b = (safetensors.torch.load_file(str(r.final_path)) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_rows_train_under_the_conditioning_the_pipeline_gives_the_loaded_token(sdxl, photos, tmp_path):
    """Loaded with the method (each part into its encoder), encode_prompt's embeddings and pooled output equal
    what the family's unet_condition computes from the initializer's ids with the rows hooked in (the trainer's
    path); undone exactly."""
    from persviz.text_stack import PlaceholderRows
    from persviz.trainers.core import placeholder_positions
    TI.train(sdxl, photos, config(2), tmp_path / "run", progress=False)
    parts = safetensors.torch.load_file(str(tmp_path / "run" / "learned_embeds.safetensors"))
    before = state(sdxl)
    prompt = "a photo of a <v> on the grass"
    with TI.loaded(sdxl, tmp_path / "run"):
        stack = text_stack(sdxl)
        for e in stack:
            assert e.has_added("<v>") and torch.equal(e.word_row("<v>"), parts[e.name][0])
        emb, _, pooled, _ = sdxl.encode_prompt(prompt, do_classifier_free_guidance=False)
        real = [e.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids for e in stack]
        hooks, ids = [], []
        for e, r in zip(stack, real):
            pid = e.tokenizer.convert_tokens_to_ids("<v>")
            mask, sel = placeholder_positions(r, [pid])
            ids.append(torch.where(mask, e.tokenizer.convert_tokens_to_ids("dog</w>"), r))
            hook = PlaceholderRows(parts[e.name])
            hook.mask, hook.sel = mask, sel
            hooks.append(hook)
        with hooks[0].hooked(stack.encoders[0].encoder), hooks[1].hooked(stack.encoders[1].encoder):
            with torch.no_grad():
                cond, added = FAMILIES["sdxl"].unet_condition(stack, ids, real, (64, 64), 64)
        torch.testing.assert_close(cond, emb, rtol=0, atol=1e-6)
        torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=1e-6)
        image = sdxl("a <v>", num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert np.isfinite(image).all()
    for (n0, v0, w0), (n1, v1, w1) in zip(before, state(sdxl)):
        assert (n0, v0) == (n1, v1) and torch.equal(w0, w1)


def test_sdxl_trains_textual_inversion_and_dreambooth_only_so_far_each_refusal_one_sentence(sdxl):
    assert training_family(sdxl, SDXL_BASE, TI) is FAMILIES["sdxl"]
    for name in ("custom_diffusion",):
        with pytest.raises(UnsupportedModelError, match=f"persviz trains textual_inversion and dreambooth on Stable "
                                                        f"Diffusion XL so far, not {name}") as info:
            training_family(sdxl, SDXL_BASE, get_method(name))
        assert "\n" not in str(info.value)


def test_persviz_train_takes_sdxl_for_textual_inversion_with_the_sdxl_recipe(sdxl, tmp_path):
    from persviz.concept_folder import read_concept
    from persviz.trainers.concept_runs import train_concept
    folder = photo_folder(tmp_path / "photos")
    run = train_concept("ti", folder, "dog", "<v>", tmp_path / "concept", model=SDXL_BASE, pipe=sdxl, steps=1,
                        resolution=64, batch_size=1, progress=False)
    cfg = json.loads((run.run_dir / "config.json").read_text())
    assert (cfg["lr"], cfg["save_every"], cfg["flip_p"]) == (1e-4, 500, 0.5)  # textual_inversion_sdxl.py's
    assert sorted(cfg["encoders"]) == ["clip_g", "clip_l"] and read_concept(tmp_path / "concept").model == SDXL_BASE
    with pytest.raises(UnsupportedModelError, match="not custom_diffusion"):
        train_concept("custom_diffusion", folder, "dog", "<v>", tmp_path / "cd", model=SDXL_BASE, pipe=sdxl, steps=1,
                      progress=False)
    assert not (tmp_path / "cd" / "custom_diffusion").exists()


def test_a_float16_sdxl_trains_float32_rows_and_is_left_in_float16(offline_sd15_cache, photos, tmp_path):
    """fp16-safe: the rows train in float32 inside a float16 SDXL (on the CPU here: no GPU in this suite), the
    SDXL VAE (force_upcast) encodes in float32 and is put back in float16, no matrix of the pipeline changes."""
    pipe = assemble_pipeline(SDXL_BASE, device="cpu", dtype=torch.float16)
    assert pipe.vae.config.force_upcast and pipe.unet.dtype == torch.float16
    before = state(pipe)
    result = TI.train(pipe, photos, config(2), tmp_path / "run", progress=False)
    parts = safetensors.torch.load_file(str(result.final_path))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in parts.values())
    assert all(np.isfinite(result.loss_history)) and pipe.vae.dtype == torch.float16
    for (n0, v0, w0), (n1, v1, w1) in zip(before, state(pipe)):
        assert (n0, v0) == (n1, v1) and torch.equal(w0, w1)
