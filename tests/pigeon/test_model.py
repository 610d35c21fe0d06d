"""Pigeon's model, pipeline and training (persviz.pigeon.model / train) on tiny random parts.

Tiny CLIP / UNet / VAE built in code (diffusers' get_dummy_components style); one check on the
shipped ShapesWorld CLIP. CPU, one thread, ~20 s."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from persviz.paths import SHAPESWORLD_DIR
from persviz.pigeon.losses import history_score, select_ratio
from persviz.pigeon.model import (CONFIG_FILE, WEIGHTS_FILE, InstructionEncoder, final_layer_norm, build_model,
                                  load_weights, save_weights)
from persviz.pigeon.train import PAIRS_FILE, RESUME_FILE, TrainConfig, train
from persviz.pigeon.users import PigeonDataset, make_users
from torch.utils.data import default_collate

K = 4  # personalized tokens of the tiny model
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # diffusers, numpy 2




@pytest.fixture(scope="module")
def init_weights(tiny_pigeon_pipeline):
    pipe = tiny_pigeon_pipeline
    return pipe.model.trainable_state_dict()


@pytest.fixture
def fresh(tiny_pigeon_pipeline, init_weights):
    """The module's tiny pipeline with its initial trainable weights."""
    pipe = tiny_pigeon_pipeline
    pipe.model.load_trainable_state_dict(init_weights)
    pipe.model.eval()
    return pipe


@pytest.fixture(scope="module")
def batch():
    ds = PigeonDataset(make_users(4, seed=0, noise_rates=0.4), seed=0)
    return default_collate([ds[i] for i in range(3)])


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- shapes and module boundaries
def test_output_shapes_match_the_unet_cross_attention(fresh, batch) -> None:
    model, C = fresh.model, fresh.unet.config.cross_attention_dim
    inputs = model.prepare(batch["history"], batch["reference"], batch["instruction"], 0.5, training=False)
    assert inputs.history_tokens.shape == (3, 5, 16, 32) and inputs.reference_tokens.shape == (3, 1, 16, 32)
    assert torch.all(inputs.history_mask.sum(-1) == 12)  # history mask ratio 0.2: 12 of 16 kept
    assert torch.all(inputs.reference_mask.sum(-1) == 8)
    assert torch.all(inputs.history_tokens[inputs.history_mask == 0] == 0)
    pe = model.condition(inputs)
    assert pe.shape == (3, 77 + K, C) and C == 32
    assert model.negative_prompt_embeds(3).shape == pe.shape
    # "text+tokens": the first 77 positions are the pipeline's own encoding of the instruction
    text_pe, neg_pe = fresh.sd.encode_prompt(batch["instruction"], "cpu", 1, True, negative_prompt=[""] * 3)
    torch.testing.assert_close(pe[:, :77], text_pe)
    torch.testing.assert_close(model.negative_prompt_embeds(3)[:, :77], neg_pe)
    # "tokens" (the paper's): the K tokens alone
    paper = build_model(fresh.scorer.model, fresh.scorer.tokenizer, C, model.prompt_encoder, model.config,
                        condition="tokens")
    pe2 = paper(batch["history"], batch["reference"], batch["instruction"], 0.5, training=False)
    assert pe2.shape == (3, K, C) and paper.negative_prompt_embeds(3).shape == (3, K, C)


def test_shipped_clip_gives_16_tokens_of_the_unet_width() -> None:
    """The shipped ShapesWorld CLIP (data/shapesworld/clip; the micro-SD's text encoder is its text tower and its
    UNet's cross_attention_dim is models.TEXT_DIM). Nothing under data/shapesworld/sd is read."""
    from transformers import CLIPModel, CLIPTokenizer

    from persviz.shapesworld.models import TEXT_DIM

    clip = CLIPModel.from_pretrained(SHAPESWORLD_DIR / "clip")
    tok = CLIPTokenizer.from_pretrained(SHAPESWORLD_DIR / "clip")
    model = build_model(clip, tok, TEXT_DIM, InstructionEncoder(clip.text_model, tok))
    cfg = model.config
    assert (cfg.n_tokens, cfg.visual_dim, cfg.text_dim, cfg.cross_attention_dim) == (16, 128, 128, TEXT_DIM)
    tokens = model.visual(torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 128)
    ds = PigeonDataset(make_users(2, seed=0), seed=0)
    b = default_collate([ds[0], ds[1]])
    pe = model(b["history"], b["reference"], b["instruction"], 0.25, training=False)
    assert pe.shape == (2, 77 + cfg.n_out_tokens, TEXT_DIM) and torch.isfinite(pe).all()
    # the K tokens come out at the scale of the text states (fixed output LayerNorm)
    ratio = pe[:, 77:].norm(dim=-1).mean() / pe[:, :77].norm(dim=-1).mean()
    assert 0.5 < ratio < 2.0


def test_initial_weights_follow_the_seed(fresh) -> None:
    m = fresh.model
    build = lambda seed: build_model(fresh.scorer.model, fresh.scorer.tokenizer, 32, m.prompt_encoder,  # noqa: E731
                                     m.config, seed=seed).trainable_state_dict()
    state = torch.random.get_rng_state()
    assert same_weights(build(5), build(5)) and not same_weights(build(5), build(6))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    # the fixed output LayerNorm is the text encoder's final LayerNorm: K tokens at the text states' scale
    ln = final_layer_norm(fresh.scorer.model.text_model)
    assert ln is not None
    assert torch.equal(m.personalization.out_norm_weight, ln.weight)
    assert torch.equal(m.personalization.out_norm_bias, ln.bias)


def test_gradient_flows_only_into_trainable_parts(fresh, batch) -> None:
    model, unet = fresh.model, fresh.unet
    model.train()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    pe = model(batch["history"], batch["reference"], batch["instruction"], None, training=True, generator=g)
    z = torch.randn(3, 4, 16, 16, generator=g)
    loss = F.mse_loss(unet(z, torch.tensor([10, 500, 900]), pe).sample, torch.randn(3, 4, 16, 16, generator=g))
    loss.backward()
    model.eval()
    trainable = {f"{n}.{k}": p for n, m in model.trainable_modules().items() for k, p in m.named_parameters()}
    missing = [k for k, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    for key in ("mask_generator.dense.weight", "mask_generator.encoder.layers.0.linear1.weight",
                "personalization.out.weight", "personalization.adapter.0.weight", "personalization.queries",
                "personalization.visual_in.weight", "personalization.text_in.weight"):
        assert trainable[key].grad.abs().sum() > 0, key  # the mask generator learns through the straight-through masks
    frozen = {"visual": model.visual, "text": model.text, "prompt_encoder": model.prompt_encoder,
              "unet": unet, "vae": fresh.vae, "clip": fresh.scorer.model}
    for name, m in frozen.items():
        for k, p in m.named_parameters():
            assert not p.requires_grad and p.grad is None, f"{name}.{k}"
    assert not model.visual.training and not model.text.training  # frozen encoders stay in eval mode
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- generation and selection
def test_pipeline_samples_with_the_real_stable_diffusion_pipeline(fresh, batch) -> None:
    out = fresh(batch["history"], batch["reference"], batch["instruction"], 0.5, num_inference_steps=2, generator=0)
    x = out.images
    assert x.shape == (3, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    again = fresh(batch["history"], batch["reference"], batch["instruction"], 0.5, num_inference_steps=2, generator=0)
    assert torch.equal(x, again.images)
    model = fresh.model
    pe = model(batch["history"], batch["reference"], batch["instruction"], 0.5, training=False)
    direct = fresh.sd(prompt_embeds=pe, negative_prompt_embeds=model.negative_prompt_embeds(3),
                      latents=torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
                      num_inference_steps=2, guidance_scale=4.0, height=32, width=32, output_type="pt").images
    torch.testing.assert_close(x, direct)


def test_select_picks_the_best_mix_of_clip_t_and_history_score(fresh, batch) -> None:
    sel = fresh.select(batch["history"], batch["reference"], batch["instruction"], num_inference_steps=2)
    assert sel.candidates.shape == (3, 5, 3, 32, 32) and sel.clip_t.shape == sel.history_score.shape == (3, 5)
    assert sel.ratio_index == [select_ratio(sel.clip_t[i], sel.history_score[i]) for i in range(3)]
    for i, j in enumerate(sel.ratio_index):
        assert torch.equal(sel.images[i], sel.candidates[i, j])
    sc = fresh.scorer
    hs = history_score(sc.embed_images(sel.candidates[1] * 2 - 1), sc.embed_images(batch["history"][1]))
    torch.testing.assert_close(sel.history_score[1], hs.float())


def test_save_and_load_weights(fresh, tmp_path) -> None:
    model = fresh.model
    w0 = model.trainable_state_dict()
    save_weights(model, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    with torch.no_grad():
        for p in model.personalization.parameters():
            p.add_(1.0)
    load_weights(model, tmp_path)
    assert same_weights(model.trainable_state_dict(), w0)
    other = build_model(fresh.scorer.model, fresh.scorer.tokenizer, 32, model.prompt_encoder, model.config,
                        d_model=64)
    with pytest.raises(ValueError, match="another PigeonConfig"):
        load_weights(other, tmp_path)


def test_bad_requests_raise_clear_errors(fresh, batch) -> None:
    h, r, t = batch["history"], batch["reference"], batch["instruction"]
    with pytest.raises(ValueError, match="history has 4 images.*exactly 5"):
        fresh(h[:, :4], r, t, num_inference_steps=1)
    with pytest.raises(ValueError, match="64x64 but the models take 32x32"):
        fresh(F.interpolate(h.flatten(0, 1), size=64).view(3, 5, 3, 64, 64), r, t, num_inference_steps=1)
    with pytest.raises(ValueError, match="is empty; name the content"):
        fresh(h, r, ["a circle", "", "a cross"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        fresh(h, r, t, reference_ratio=1.5, num_inference_steps=1)
    with pytest.raises(ValueError, match="at most 16 are read"):
        fresh.model(h[:1], r[:1], " ".join(["a red circle"] * 8), 0.5, training=False)
    with pytest.raises(ValueError, match="cross_attention_dim is 32"):
        type(fresh)(build_model(fresh.scorer.model, fresh.scorer.tokenizer, 48, None, fresh.model.config,
                                condition="tokens"), fresh.sd)


# ---------------------------------------------------------------- training
def stage1(pipe, out, steps, callback=None, **kw):
    cfg = TrainConfig(stage=1, steps=steps, batch_size=2, n_users=10, save_every=2, warmup=2, **kw)
    return train(pipe, cfg, out, progress=False, callback=callback, backbone="tiny")


class Stop(Exception):
    pass


def stop_at(step: int):
    def cb(k: int, loss: float) -> None:
        if k == step:
            raise Stop
    return cb


def test_stage1_resume_equals_uninterrupted(fresh, init_weights, tmp_path) -> None:
    a = stage1(fresh, tmp_path / "a", 4)
    wa = fresh.model.trainable_state_dict()
    assert len(a.losses) == 4 and all(math.isfinite(x) for x in a.losses)
    assert not same_weights(wa, init_weights)
    assert fresh.model.mask_generator.dense.weight.requires_grad  # flags restored
    # a run killed after step 3 (snapshot at step 2), then resumed in a "new process"
    fresh.model.load_trainable_state_dict(init_weights)
    with pytest.raises(Stop):
        stage1(fresh, tmp_path / "b", 4, callback=stop_at(3))
    assert torch.load(tmp_path / "b" / RESUME_FILE, weights_only=True)["step"] == 2
    fresh.model.load_trainable_state_dict(init_weights)
    b = stage1(fresh, tmp_path / "b", 4)
    assert b.losses == a.losses
    assert same_weights(fresh.model.trainable_state_dict(), wa)
    assert same_weights(load_file(str(tmp_path / "b" / WEIGHTS_FILE)), wa)
    assert sorted(p.name for p in (tmp_path / "b" / "snapshots").iterdir()) == [
        "pigeon-steps-2.safetensors", "pigeon-steps-4.safetensors"]
    with pytest.raises(ValueError, match="different setup.*lr"):
        stage1(fresh, tmp_path / "b", 4, lr=1e-3)
    c = stage1(fresh, tmp_path / "b", 5)  # extend a finished run
    assert c.losses[:4] == a.losses and len(c.losses) == 5


def test_aux_loss_is_added_and_can_be_turned_off(fresh, init_weights, tmp_path) -> None:
    with pytest.raises(ValueError, match="aux_weight"):
        TrainConfig(stage=1, aux_weight=-0.1)
    on = stage1(fresh, tmp_path / "on", 2)
    assert len(on.stats["aux"]) == 2 and all(0.0 <= a <= 2.0 for a in on.stats["aux"])
    # the logged loss is diffusion + aux_weight * aux, term by term
    for total, d, a in zip(on.losses, on.stats["diffusion"], on.stats["aux"]):
        assert total == pytest.approx(d + 0.1 * a, rel=1e-5)
    assert "aux_head" in torch.load(tmp_path / "on" / RESUME_FILE, weights_only=True)
    fresh.model.load_trainable_state_dict(init_weights)
    off = stage1(fresh, tmp_path / "off", 2, aux_weight=0.0)
    assert off.stats == {} and off.losses[0] == pytest.approx(on.stats["diffusion"][0], rel=1e-5)
    # the shipped weights never hold the training-only head
    assert not any(k.startswith("aux") for k in load_file(str(tmp_path / "on" / WEIGHTS_FILE)))


def test_stage2_pairs_dpo_and_exact_resume(fresh, init_weights, tmp_path) -> None:
    stage1(fresh, tmp_path / "s1", 2)
    w1 = fresh.model.trainable_state_dict()
    cfg = TrainConfig(stage=2, steps=3, batch_size=2, n_users=10, n_pairs=4, pair_batch=2, pair_steps=2,
                      save_every=1, warmup=1, beta=2500.0, init_from=str(tmp_path / "s1"))
    fresh.model.load_trainable_state_dict(init_weights)  # stage 2 loads the stage-1 weights itself
    a = train(fresh, cfg, tmp_path / "a", progress=False, backbone="tiny")
    wa = fresh.model.trainable_state_dict()
    pairs = torch.load(tmp_path / "a" / PAIRS_FILE, weights_only=True)
    scores = torch.cat(pairs["scores"])
    assert pairs["done"] == 4 and scores.shape == (4, 5)
    assert torch.equal(torch.cat(pairs["chosen_ratio"]), scores.argmax(1))
    assert torch.equal(torch.cat(pairs["rejected_ratio"]), scores.argmin(1))
    assert torch.cat(pairs["chosen"]).shape == (4, 4, 16, 16)
    assert all(math.isfinite(x) for x in a.losses)
    assert a.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == frozen stage-1 reference at step 0
    assert set(a.stats) >= {"implicit_acc", "model_diff", "ref_diff"}
    for k in w1:  # the MaskGenerator is frozen in stage 2; the personalization module moves (not its fixed output norm)
        assert torch.equal(wa[k], w1[k]) == (k.startswith("mask_generator.") or ".out_norm_" in k), k
    fresh.model.load_trainable_state_dict(init_weights)
    with pytest.raises(Stop):
        train(fresh, cfg, tmp_path / "b", progress=False, callback=stop_at(2), backbone="tiny")
    fresh.model.load_trainable_state_dict(init_weights)
    b = train(fresh, cfg, tmp_path / "b", progress=False, backbone="tiny")
    assert b.losses == a.losses and same_weights(fresh.model.trainable_state_dict(), wa)
    pb = torch.load(tmp_path / "b" / PAIRS_FILE, weights_only=True)
    assert torch.equal(torch.cat(pb["chosen"]), torch.cat(pairs["chosen"]))
