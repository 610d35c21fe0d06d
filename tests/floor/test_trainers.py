"""DreamBooth-LoRA and Custom Diffusion on a tiny random StableDiffusionPipeline: what trains, the saved formats,
exact resume, the class-image cache, and the errors."""
import copy
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from persviz.embeddings import class_word_id, token_row
from persviz.trainers import (
    CustomDiffusionConfig,
    DreamBoothLoRAConfig,
    list_custom_diffusion_snapshots,
    list_lora_snapshots,
    load_custom_diffusion,
    load_dreambooth_lora,
    train_custom_diffusion,
    train_dreambooth_lora,
)
from persviz.trainers.core import CLASS_DIR, CLASS_MANIFEST, CONFIG_FILE, RESUME_FILE
from persviz.trainers.custom_diffusion import EMBEDS_FILE, WEIGHTS_FILE, augmented, instance_mask

from tests.helpers import D

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRIOR = {"prior_preservation": True, "num_class_images": 2, "class_steps": 2, "class_batch_size": 2}


def _db(**kw):
    return DreamBoothLoRAConfig(**{"steps": 4, "save_every": 2, "prior_preservation": False, **kw})


def _cd(**kw):
    return CustomDiffusionConfig(**{"steps": 4, "save_every": 2, **kw})


def _image(pipe, prompt):
    return pipe(prompt, num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _snapshot(pipe):
    """Everything training must leave as it was: weights, keys, flags, modes, processors, hooks, vocabulary."""
    mods = (pipe.unet, pipe.text_encoder, pipe.vae)
    return {"sd": [{k: v.clone() for k, v in m.state_dict().items()} for m in mods],
            "flags": [[p.requires_grad for p in m.parameters()] for m in mods],
            "modes": [[s.training for s in m.modules()] for m in mods],
            "attrs": [sorted(m.__dict__) for m in mods],
            "procs": dict(pipe.unet.attn_processors),
            "hooks": len(pipe.text_encoder.get_input_embeddings()._forward_hooks),
            "vocab": len(pipe.tokenizer)}


def _assert_unchanged(pipe, snap):
    now = _snapshot(pipe)
    for a, b in zip(now["sd"], snap["sd"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert now["flags"] == snap["flags"] and now["modes"] == snap["modes"] and now["attrs"] == snap["attrs"]
    assert now["procs"].keys() == snap["procs"].keys()
    assert all(now["procs"][k] is snap["procs"][k] for k in now["procs"])
    assert now["hooks"] == snap["hooks"] and now["vocab"] == snap["vocab"]
    assert all(p.grad is None for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters())


# ----------------------------------------------------------------------------- DreamBooth-LoRA


def test_lora_trains_only_the_adapters_and_restores_the_pipeline(tiny_sd_pipeline, red_square_images, tmp_path):
    pipe, images = tiny_sd_pipeline, red_square_images
    snap = _snapshot(pipe)
    rng = torch.random.get_rng_state()
    res = train_dreambooth_lora(pipe, images, _db(), tmp_path, progress=False, load_result=False)
    assert torch.equal(rng, torch.random.get_rng_state())  # no global random state read or set
    _assert_unchanged(pipe, snap)
    assert res.steps == 4 and len(res.loss_history) == 4 and np.isfinite(res.loss_history).all()
    sd = load_file(str(res.final_path))
    unet_keys = [k for k in sd if k.startswith("unet.")]
    te_keys = [k for k in sd if k.startswith("text_encoder.")]
    assert len(unet_keys) + len(te_keys) == len(sd) and "lora" in "".join(sd)
    # 8 attention layers x (to_q, to_k, to_v, to_out.0) x (down, up); 2 CLIP layers x 4 projections x (down, up)
    assert len(unet_keys) == 8 * 4 * 2 and len(te_keys) == 2 * 4 * 2
    targets = [re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.lora", k) for k in unet_keys]
    assert all(targets) and {m.group(1) for m in targets} == {"to_q", "to_k", "to_v", "to_out.0"}
    targets = [re.search(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.lora", k) for k in te_keys]
    assert all(targets) and {m.group(1) for m in targets} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    ups = [v for k, v in sd.items() if ".up." in k or "lora_B" in k]
    assert len(ups) == len(sd) // 2 and all(v.abs().max() > 0 for v in ups)  # B starts at zero and moved
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["rank"] == 4

    only_unet = train_dreambooth_lora(pipe, images, _db(train_text_encoder=False, steps=2), tmp_path / "u",
                                      progress=False, load_result=False)
    assert all(k.startswith("unet.") for k in load_file(str(only_unet.final_path)))
    _assert_unchanged(pipe, snap)


def test_lora_snapshots_load_and_change_the_output(tiny_sd_pipeline, tiny_sd_pipeline_shared, red_square_images, tmp_path):
    pipe, base_pipe, images = tiny_sd_pipeline, tiny_sd_pipeline_shared, red_square_images
    cfg = _db(lr=1e-3, **PRIOR)
    res = train_dreambooth_lora(pipe, images, cfg, tmp_path, progress=False)
    snaps = list_lora_snapshots(tmp_path)
    assert [s for s, _ in snaps] == [2, 4] and [p for _, p in snaps] == res.snapshot_paths
    assert pipe.get_list_adapters()  # load_result: the final LoRA is in pipe
    prompt = "a photo of sks square"
    before = _image(copy.deepcopy(base_pipe), prompt)
    outs = []
    for _, path in snaps:
        fresh = copy.deepcopy(base_pipe)
        fresh.load_lora_weights(str(path))  # the diffusers format
        outs.append(_image(fresh, prompt))
        assert np.abs(outs[-1] - before).max() > 1e-4
    assert np.abs(outs[0] - outs[1]).max() > 0
    fresh = load_dreambooth_lora(copy.deepcopy(base_pipe), tmp_path)  # the final weights in out_dir
    assert np.array_equal(_image(fresh, prompt), _image(pipe, prompt))
    assert np.array_equal(_image(fresh, prompt), outs[1])  # the last snapshot is the final state
    fresh.unload_lora_weights()
    assert np.array_equal(_image(fresh, prompt), before)


def test_lora_interrupted_and_extended_runs_equal_an_uninterrupted_one(tiny_sd_pipeline_shared, red_square_images, tmp_path, monkeypatch):
    base_pipe, images = tiny_sd_pipeline_shared, red_square_images
    cfg = _db(steps=5, **PRIOR)
    full = train_dreambooth_lora(copy.deepcopy(base_pipe), images, cfg, tmp_path / "full", progress=False,
                                 load_result=False)

    def stop_at_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    pipe = copy.deepcopy(base_pipe)
    snap = _snapshot(pipe)
    with pytest.raises(KeyboardInterrupt):
        train_dreambooth_lora(pipe, images, cfg, tmp_path / "cut", progress=False, callback=stop_at_3)
    _assert_unchanged(pipe, snap)  # the interrupted call left the pipeline as it was
    assert torch.load(tmp_path / "cut" / RESUME_FILE, weights_only=True)["step"] == 2
    cls = tmp_path / "cut" / CLASS_DIR
    assert sorted(p.name for p in cls.iterdir()) == ["00000.png", "00001.png", CLASS_MANIFEST]

    def no_generation(*a, **k):
        raise AssertionError("the class images were generated again")

    monkeypatch.setattr("persviz.generation.generate", no_generation)
    cut = train_dreambooth_lora(pipe, images, cfg, tmp_path / "cut", progress=False, load_result=False)
    monkeypatch.undo()
    short = train_dreambooth_lora(copy.deepcopy(base_pipe), images, _db(steps=3, **PRIOR), tmp_path / "ext",
                                  progress=False, load_result=False)
    assert short.steps == 3 and len(short.loss_history) == 3
    monkeypatch.setattr("persviz.generation.generate", no_generation)
    ext = train_dreambooth_lora(copy.deepcopy(base_pipe), images, cfg, tmp_path / "ext", progress=False,
                                load_result=False)

    ref = load_file(str(full.final_path))
    for run in (cut, ext):
        got = load_file(str(run.final_path))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        assert run.loss_history == full.loss_history
        assert [s for s, _ in list_lora_snapshots(run.out_dir)] == [2, 4]
        assert (json.loads((run.class_images_dir / CLASS_MANIFEST).read_text())
                == json.loads((full.class_images_dir / CLASS_MANIFEST).read_text()))  # same seed, same images
    with pytest.raises(ValueError, match="already at step 5"):
        train_dreambooth_lora(copy.deepcopy(base_pipe), images, _db(steps=4, **PRIOR), tmp_path / "full",
                              progress=False)
    # a changed class image is noticed, not silently used
    from PIL import Image
    first = full.class_images_dir / "00000.png"
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first)
    with pytest.raises(ValueError, match="were changed"):
        train_dreambooth_lora(copy.deepcopy(base_pipe), images, _db(steps=6, **PRIOR), tmp_path / "full",
                              progress=False)


# ----------------------------------------------------------------------------- Custom Diffusion


def _cross_names(unet):
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


def test_cd_trains_only_kv_and_the_modifier_row(tiny_sd_pipeline, red_square_images, tmp_path):
    pipe, images = tiny_sd_pipeline, red_square_images
    snap = _snapshot(pipe)
    rng = torch.random.get_rng_state()
    res = train_custom_diffusion(pipe, images, _cd(), tmp_path, progress=False, load_result=False)
    assert torch.equal(rng, torch.random.get_rng_state())
    _assert_unchanged(pipe, snap)
    assert len(res.loss_history) == 4 and np.isfinite(res.loss_history).all()
    sd = load_file(str(res.final_path))
    names = _cross_names(pipe.unet)
    assert len(names) == 4
    assert sorted(sd) == sorted(f"{n}.{w}_custom_diffusion.weight" for n in names for w in ("to_k", "to_v"))
    for n in names:
        attn = pipe.unet.get_submodule(n[:-len(".processor")])
        for w in ("to_k", "to_v"):
            trained, base = sd[f"{n}.{w}_custom_diffusion.weight"], getattr(attn, w).weight
            assert trained.dtype == torch.float32 and trained.shape == base.shape and not torch.equal(trained, base)
    emb = load_file(str(res.embedding_path))
    assert list(emb) == ["<new1>"] and emb["<new1>"].shape in ((D,), (1, D))
    init = pipe.text_encoder.get_input_embeddings().weight[class_word_id(pipe.tokenizer, "square")]
    assert not torch.equal(emb["<new1>"].reshape(D), init)


def test_cd_snapshots_load_like_diffusers_and_change_the_output(tiny_sd_pipeline, tiny_sd_pipeline_shared, red_square_images, tmp_path):
    pipe, base_pipe, images = tiny_sd_pipeline, tiny_sd_pipeline_shared, red_square_images
    res = train_custom_diffusion(pipe, images, _cd(lr=1e-3), tmp_path, progress=False)
    snaps = list_custom_diffusion_snapshots(tmp_path)
    assert [s for s, _ in snaps] == [2, 4] and [p for _, p in snaps] == res.snapshot_paths
    assert all(sorted(q.name for q in p.iterdir()) == [EMBEDS_FILE, WEIGHTS_FILE] for _, p in snaps)
    plain, personal = "photo of a square", "photo of a <new1> square"
    before = _image(copy.deepcopy(base_pipe), plain)
    fresh = load_custom_diffusion(copy.deepcopy(base_pipe), snaps[0][1])
    assert np.abs(_image(fresh, plain) - before).max() > 1e-4  # the new K/V change the output
    row = fresh.text_encoder.get_input_embeddings().weight[token_row(fresh, "<new1>")]
    assert torch.equal(row, load_file(str(snaps[0][1] / EMBEDS_FILE))["<new1>"].reshape(D))

    # diffusers' own parser of the file gives the same processors (unet.load_attn_procs reads the file but, in
    # diffusers 0.42, installs nothing; see the module docstring)
    ref = copy.deepcopy(base_pipe)
    ref.unet.load_attn_procs(str(tmp_path / WEIGHTS_FILE))
    procs = dict(ref.unet.attn_processors)
    procs.update(ref.unet._process_custom_diffusion(load_file(str(tmp_path / WEIGHTS_FILE))))
    ref.unet.set_attn_processor(procs)
    ref.load_textual_inversion(str(tmp_path / EMBEDS_FILE))
    final = load_custom_diffusion(copy.deepcopy(base_pipe), tmp_path)
    out = _image(ref, personal)
    assert np.array_equal(_image(final, personal), out)
    assert np.array_equal(_image(pipe, personal), out)  # load_result loaded the same into pipe
    assert not np.array_equal(_image(fresh, personal), out)  # step 2 differs from step 4


def test_cd_interrupted_run_with_augmentation_and_prior_equals_an_uninterrupted_one(tiny_sd_pipeline_shared, red_square_images, tmp_path,
                                                                                     monkeypatch):
    base_pipe, images = tiny_sd_pipeline_shared, red_square_images
    cfg = _cd(steps=5, batch_size=2, flip_p=0.5, **PRIOR)
    full = train_custom_diffusion(copy.deepcopy(base_pipe), images, cfg, tmp_path / "full", progress=False,
                                  load_result=False)
    seen = []

    def stop_at_3(step, loss, emb):
        assert emb.shape == (1, D)
        seen.append(step)
        if step == 3:
            raise KeyboardInterrupt

    pipe = copy.deepcopy(base_pipe)
    snap = _snapshot(pipe)
    with pytest.raises(KeyboardInterrupt):
        train_custom_diffusion(pipe, images, cfg, tmp_path / "cut", progress=False, callback=stop_at_3)
    _assert_unchanged(pipe, snap)
    assert seen == [1, 2, 3]
    monkeypatch.setattr("persviz.generation.generate", lambda *a, **k: pytest.fail("class images generated again"))
    cut = train_custom_diffusion(pipe, images, cfg, tmp_path / "cut", progress=False, load_result=False)
    for f in (WEIGHTS_FILE, EMBEDS_FILE):
        a, b = load_file(str(full.out_dir / f)), load_file(str(cut.out_dir / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cut.loss_history == full.loss_history and len(cut.loss_history) == 5


def test_cd_mask_and_augmentation_follow_the_example(red_square_images):
    images = red_square_images
    m = instance_mask(64, 8, 64, 0, 0)  # no augmentation: a one-pixel border is left out
    assert m.shape == (8, 8) and m.sum() == 36 and m[0].sum() == 0 and m[1:7, 1:7].all()
    assert instance_mask(64, 8, 80, 5, 9).all()  # zoomed in: everything
    small = instance_mask(16, 8, 6, 3, 3)  # the border would leave nothing: the pasted region instead
    assert small.sum() >= 1
    x = augmented(images, 0, False, 10, 2, 3)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert (x[:2] == 0).all() and (x[12:] == 0).all() and np.abs(x[2:12, 3:13]).max() > 0
    big = augmented(images, 1, True, 40, 4, 0)
    assert big.shape == (32, 32, 3) and -1 <= big.min() and big.max() <= 1


# ----------------------------------------------------------------------------- errors


def test_clear_errors(tiny_sd_pipeline, red_square_images, tmp_path):
    pipe, images = tiny_sd_pipeline, red_square_images
    with pytest.raises(ValueError, match="rank must be >= 1"):
        DreamBoothLoRAConfig(rank=0)
    with pytest.raises(ValueError, match="must differ"):
        DreamBoothLoRAConfig(identifier="square")
    with pytest.raises(ValueError, match="does not contain the identifier"):
        DreamBoothLoRAConfig(instance_prompt="a photo of a square")
    with pytest.raises(ValueError, match="must hold the modifier token"):
        CustomDiffusionConfig(instance_prompt="a photo of a square")
    with pytest.raises(ValueError, match="must be a DreamBoothLoRAConfig"):
        train_dreambooth_lora(pipe, images, _cd(), tmp_path / "x", progress=False)
    for train, cfg in ((train_dreambooth_lora, _db()), (train_custom_diffusion, _cd())):
        with pytest.raises(ValueError, match="empty"):
            train(pipe, [], cfg, tmp_path / "a", progress=False)
        with pytest.raises(ValueError, match="mixed sizes"):
            train(pipe, [images[0], images[1, :16]], cfg, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="already a token"):
        train_custom_diffusion(pipe, images, _cd(modifier_token="circle"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="unknown class word 'zebra'"):
        train_custom_diffusion(pipe, images, _cd(initializer="zebra"), tmp_path / "d", progress=False)
    pipe.load_textual_inversion({"<v*>": torch.zeros(D)}, token="<v*>")
    with pytest.raises(ValueError, match=r"already a token added .*unload_textual_inversion"):
        train_dreambooth_lora(pipe, images, _db(identifier="<v*>"), tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="unload_textual_inversion"):
        train_custom_diffusion(pipe, images, _cd(modifier_token="<v*>"), tmp_path / "f", progress=False)
    train_dreambooth_lora(pipe, images, _db(steps=1), tmp_path / "g", progress=False, load_result=False)
    with pytest.raises(ValueError, match=r"different setup \(lr: "):
        train_dreambooth_lora(pipe, images, _db(steps=1, lr=1e-3), tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match="images_sha256"):
        train_dreambooth_lora(pipe, images[::-1], _db(steps=1), tmp_path / "g", progress=False)
    train_dreambooth_lora(pipe, images, _db(steps=1), tmp_path / "g", progress=False)  # finished: loads it
    with pytest.raises(ValueError, match="unload_lora_weights"):
        train_dreambooth_lora(pipe, images, _db(steps=1), tmp_path / "g", progress=False)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / RESUME_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        train_custom_diffusion(pipe, images, _cd(), tmp_path / "h", progress=False)
    with pytest.raises(FileNotFoundError, match="no Custom Diffusion weights"):
        load_custom_diffusion(pipe, tmp_path / "h")


def test_a_finished_run_shipped_without_resume_state_is_not_retrained(tiny_sd_pipeline_shared, red_square_images, tmp_path):
    """persviz's ShapesWorld runs ship their final weights and config.json but no resume_state.pt: training again
    must load them as they are, not start over from step 0 (and more steps cannot be resumed)."""
    pipe, images = tiny_sd_pipeline_shared, red_square_images
    for train, cfg, name, final in ((train_dreambooth_lora, _db(steps=2), "db", "pytorch_lora_weights.safetensors"),
                                    (train_custom_diffusion, _cd(steps=2), "cd",
                                     "pytorch_custom_diffusion_weights.safetensors")):
        out = tmp_path / name
        train(pipe, images, cfg, out, progress=False, load_result=False)
        (out / RESUME_FILE).unlink()
        before = (out / final).read_bytes()
        result = train(pipe, images, cfg, out, progress=False, load_result=False)
        assert (out / final).read_bytes() == before and not (out / RESUME_FILE).exists()
        assert result.loss_history == []
        with pytest.raises(ValueError, match="cannot be extended"):
            train(pipe, images, dataclasses.replace(cfg, steps=3), out, progress=False, load_result=False)
