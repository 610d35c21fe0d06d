"""Textual Inversion on a tiny random StableDiffusionPipeline: rows, snapshots, resume, the example's update, errors."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from persviz.embeddings import class_word_id, token_row
from persviz.paths import SHAPESWORLD_DIR
from persviz.shapesworld.train import step_rng
from persviz.trainers import TextualInversionConfig, list_snapshots, load_snapshot_embedding, train_textual_inversion
from persviz.trainers.textual_inversion import CONFIG_FILE, RESUME_FILE

from tests.helpers import D

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATES = ("a {}", "a {} on a gray background", "a photo of a {}")


def _cfg(**kw):
    return TextualInversionConfig(**{"placeholder": "<v*>", "initializer": "square", "steps": 6, "save_every": 3,
                       "templates": TEMPLATES, **kw})


def _W(pipe):
    return pipe.text_encoder.get_input_embeddings().weight.detach()


def test_only_the_placeholder_row_changes_and_the_pipeline_is_restored(tiny_sd_pipeline, red_square_images, tmp_path):
    pipe, images = tiny_sd_pipeline, red_square_images
    W0, V0 = _W(pipe).clone(), len(pipe.tokenizer)
    unet0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    init = class_word_id(pipe.tokenizer, "square")
    res = train_textual_inversion(pipe, images, _cfg(), tmp_path, progress=False)
    assert res.steps == 6 and len(res.loss_history) == 6 and np.isfinite(res.loss_history).all()
    W = _W(pipe)
    ph = token_row(pipe, "<v*>")
    assert ph == V0 and W.shape[0] == V0 + 1
    assert torch.equal(W[:V0], W0)  # every other row bit-identical
    final = load_snapshot_embedding(res.final_path)
    assert final.dtype == torch.float32 and final.shape == (D,)
    assert torch.equal(W[ph], final) and not torch.equal(final, W0[init])  # the row moved off its initializer
    assert all(torch.equal(v, unet0[k]) for k, v in pipe.unet.state_dict().items())
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):  # flags restored, no gradients left behind
        assert all(p.requires_grad and p.grad is None for p in m.parameters())
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["steps"] == 6


def test_snapshots_every_save_every_load_into_a_fresh_pipeline(tiny_sd_pipeline, tiny_sd_pipeline_shared, red_square_images, tmp_path):
    pipe, base_pipe, images = tiny_sd_pipeline, tiny_sd_pipeline_shared, red_square_images
    res = train_textual_inversion(pipe, images, _cfg(steps=7), tmp_path, progress=False, load_result=False)
    assert len(pipe.tokenizer) == len(base_pipe.tokenizer)  # load_result=False: pipe untouched
    snaps = list_snapshots(tmp_path)
    assert [s for s, _ in snaps] == [3, 6] and [p for _, p in snaps] == res.snapshot_paths
    rows = [load_snapshot_embedding(p) for _, p in snaps]
    assert not torch.equal(rows[0], rows[1])
    fresh = copy.deepcopy(base_pipe)
    fresh.load_textual_inversion(str(snaps[0][1]))
    assert torch.equal(_W(fresh)[token_row(fresh, "<v*>")], rows[0])
    assert list(load_file(str(snaps[0][1]))) == ["<v*>"]  # diffusers format: {token: [1, D]}
    out = fresh("a <v*>", num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_interrupted_and_extended_runs_equal_an_uninterrupted_one(tiny_sd_pipeline_shared, red_square_images, tmp_path):
    base_pipe, images = tiny_sd_pipeline_shared, red_square_images
    cfg = _cfg(steps=7)
    full = train_textual_inversion(copy.deepcopy(base_pipe), images, cfg, tmp_path / "full", progress=False,
                                   load_result=False)

    def stop_at_5(step, loss, emb):
        assert emb.shape == (1, D)
        if step == 5:
            raise KeyboardInterrupt

    pipe = copy.deepcopy(base_pipe)
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(pipe, images, cfg, tmp_path / "cut", progress=False, callback=stop_at_5)
    assert torch.load(tmp_path / "cut" / RESUME_FILE, weights_only=True)["step"] == 3
    assert len(pipe.tokenizer) == len(base_pipe.tokenizer)  # the interrupted call left the pipeline as it was
    cut = train_textual_inversion(pipe, images, cfg, tmp_path / "cut", progress=False, load_result=False)

    short = train_textual_inversion(copy.deepcopy(base_pipe), images, _cfg(steps=4), tmp_path / "ext",
                                    progress=False, load_result=False)
    assert short.steps == 4 and len(short.loss_history) == 4
    ext = train_textual_inversion(copy.deepcopy(base_pipe), images, cfg, tmp_path / "ext", progress=False,
                                  load_result=False)

    ref = load_file(str(full.final_path))["<v*>"]
    for run in (cut, ext):
        assert torch.equal(load_file(str(run.final_path))["<v*>"], ref)
        assert run.loss_history == full.loss_history
        assert [s for s, _ in list_snapshots(run.out_dir)] == [3, 6]
    with pytest.raises(ValueError, match="already at step 7"):
        train_textual_inversion(copy.deepcopy(base_pipe), images, _cfg(steps=5), tmp_path / "full", progress=False)


def test_matches_the_diffusers_example_full_matrix_update(tiny_sd_pipeline_shared, red_square_images, tmp_path):
    """The example's mechanics (resize, AdamW on the whole matrix, index_no_updates) give the same row."""
    base_pipe, images = tiny_sd_pipeline_shared, red_square_images
    cfg = _cfg(steps=3, templates=("a {}",), flip_p=0.0)
    res = train_textual_inversion(copy.deepcopy(base_pipe), images[:1], cfg, tmp_path, progress=False,
                                  load_result=False)
    from diffusers import DDPMScheduler
    from PIL import Image

    pipe = copy.deepcopy(base_pipe)
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    tok.add_tokens(["<v*>"])
    ph, init = tok.convert_tokens_to_ids("<v*>"), class_word_id(tok, "square")
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[ph] = emb[init].clone()
    orig = emb.detach().clone()
    for m in (vae, unet, te):
        m.requires_grad_(False).eval()
    emb.requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=cfg.lr, weight_decay=1e-2)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    x = torch.from_numpy(np.array(Image.fromarray(images[0]).resize((16, 16), Image.Resampling.BICUBIC)))
    x = x[None].permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = tok(["a <v*>"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[ph] = False
    for s in range(3):
        _, g = step_rng(cfg.seed, s)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
        eps, noise = torch.randn(post.mean.shape, generator=g), torch.randn(post.mean.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        z0 = (post.mean + post.std * eps) * vae.config.scaling_factor
        pred = unet(noise_sched.add_noise(z0, noise, t), t, te(ids)[0]).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            emb[keep] = orig[keep]
    assert torch.equal(load_snapshot_embedding(res.final_path), emb.detach()[ph])  # bit for bit


def test_multi_vector_placeholder_loads_as_diffusers_tokens(tiny_sd_pipeline, red_square_images, tmp_path):
    pipe, images = tiny_sd_pipeline, red_square_images
    res = train_textual_inversion(pipe, images, _cfg(steps=2, num_vectors=2, save_every=2), tmp_path, progress=False)
    rows = load_snapshot_embedding(res.final_path)
    assert rows.shape == (2, D) and not torch.equal(rows[0], rows[1])  # one start, two positions, two gradients
    W = _W(pipe)
    assert torch.equal(W[token_row(pipe, "<v*>")], rows[0]) and torch.equal(W[token_row(pipe, "<v*>_1")], rows[1])
    assert pipe.maybe_convert_prompt("a <v*>", pipe.tokenizer) == "a <v*> <v*>_1"


def test_clear_errors(tiny_sd_pipeline, red_square_images, tmp_path):
    pipe, images = tiny_sd_pipeline, red_square_images
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TextualInversionConfig(steps=0)
    with pytest.raises(ValueError, match="exactly one"):
        TextualInversionConfig(templates=("a photo",))
    with pytest.raises(ValueError, match="unknown class word 'zebra'"):
        train_textual_inversion(pipe, images, _cfg(initializer="zebra"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="already a token"):
        train_textual_inversion(pipe, images, _cfg(placeholder="circle"), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_textual_inversion(pipe, [], _cfg(), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="mixed sizes"):
        train_textual_inversion(pipe, [images[0], images[1, :16]], _cfg(), tmp_path / "d", progress=False)
    train_textual_inversion(pipe, images, _cfg(steps=1), tmp_path / "e", progress=False, load_result=False)
    with pytest.raises(ValueError, match=r"different setup \(lr: "):
        train_textual_inversion(pipe, images, _cfg(steps=1, lr=1e-3), tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="images_sha256"):
        train_textual_inversion(pipe, images[::-1], _cfg(steps=1), tmp_path / "e", progress=False)
    train_textual_inversion(pipe, images, _cfg(steps=1), tmp_path / "e", progress=False)  # finished: loads it
    with pytest.raises(ValueError, match="unload_textual_inversion"):
        train_textual_inversion(pipe, images, _cfg(steps=1), tmp_path / "e", progress=False)
