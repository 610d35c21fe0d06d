"""The offline cache: SD 1.5, CLIP ViT-L/14, DINOv2-base and DINO ViT-S/16 under their real Hub ids load through persviz.loading
offline exactly as the real downloads would; missing ids name the `hf download` line."""
import fnmatch
import json
import os
import shutil

import numpy as np
import pytest
import torch

from persviz.hub_models import HUB_MODELS, download_command, is_cached
from persviz.loading import CLIP_L14, DINO, DINO_DREAMBENCH, SD15, ModelNotAvailableError, load_evaluator, load_pipeline
from persviz.sd15 import SMALL_SIDE, SMALL_TEXT_WIDTH, build_sd15_pipeline, offline_commit
from tests.fullscale.conftest import point_hub_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the files of stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hub (main): what `hf download` records in trees/
SD15_REPO_FILES = """.gitattributes README.md feature_extractor/preprocessor_config.json model_index.json
safety_checker/config.json safety_checker/model.fp16.safetensors safety_checker/model.safetensors
safety_checker/pytorch_model.bin safety_checker/pytorch_model.fp16.bin scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.fp16.safetensors text_encoder/model.safetensors
text_encoder/pytorch_model.bin text_encoder/pytorch_model.fp16.bin tokenizer/merges.txt
tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json unet/config.json
unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.non_ema.bin unet/diffusion_pytorch_model.non_ema.safetensors
unet/diffusion_pytorch_model.safetensors v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors v1-5-pruned.ckpt
v1-5-pruned.safetensors vae/config.json vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors""".split()


def snapshot_files(snapshot) -> set[str]:
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


def test_cache_has_the_real_layout(offline_sd15_cache):
    root = offline_sd15_cache["cache_dir"]
    for hub_id, snapshot in offline_sd15_cache["snapshots"].items():
        repo = root / ("models--" + hub_id.replace("/", "--"))
        commit = (repo / "refs" / "main").read_text()
        assert commit == offline_commit(hub_id) and len(commit) == 40 and snapshot == repo / "snapshots" / commit
        files = snapshot_files(snapshot)
        assert files == set(HUB_MODELS[hub_id].files)  # exactly what the loader reads, nothing else
        for name in files:  # each one matched by the `hf download --include` patterns
            assert any(fnmatch.fnmatch(name, p) for p in HUB_MODELS[hub_id].patterns), name
        links = [snapshot / f for f in files]
        if all(p.is_symlink() for p in links):
            assert all(p.resolve().parent == (repo / "blobs").resolve() for p in links)
        tree = json.loads((repo / "trees" / f"{commit}.json").read_text())
        assert tree["format_version"] == 1 and set(tree["files"]) == files
        assert is_cached(hub_id)
    sd = offline_sd15_cache["snapshots"][SD15]
    assert json.loads((sd / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (sd / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_pipeline_loads_offline_and_generates_64px(offline_sd15_cache):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = load_pipeline(SD15, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
    assert pipe.text_encoder.config.hidden_size == SMALL_TEXT_WIDTH == pipe.unet.config.cross_attention_dim
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    assert pipe.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == SMALL_SIDE
    out = pipe(["a photo of a dog", "a red car"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()
    # the same weights as build_sd15_pipeline(small=True): the cache holds that pipeline
    ref = build_sd15_pipeline(small=True, seed=0)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_evaluators_load_offline(offline_sd15_cache):
    from persviz.evaluators import HFClipEvaluator, HFDinoEvaluator
    images = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
    clip = load_evaluator(CLIP_L14, kind="clip", device="cpu")
    assert isinstance(clip, HFClipEvaluator)
    img, txt = clip.embed_images(images), clip.embed_texts(["a photo of a dog", "a red car"])
    assert img.shape == txt.shape == (2, 32) and torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert clip.processor.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    dino = load_evaluator(DINO, kind="dino", device="cpu")
    assert isinstance(dino, HFDinoEvaluator)
    emb = dino.embed_images(images)
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_dreambench_dino_is_the_cls_token(offline_sd15_cache):
    """DreamBench's DINO-I: DINO ViT-S/16's CLS token; the TEA code's: DINOv2-base's mean over tokens."""
    from persviz.evaluation import describe_evaluator
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    vits = load_evaluator(DINO_DREAMBENCH, kind="dino", device="cpu")
    assert vits.pooling == "cls" and type(vits.model).__name__ == "ViTModel"
    px = vits.processor(images=list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        cls = vits.model(pixel_values=px).last_hidden_state[:, 0]
    assert torch.allclose(vits.embed_images(images), torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)
    assert describe_evaluator(vits) == f"{DINO_DREAMBENCH} (CLS token)"
    assert describe_evaluator(load_evaluator(DINO, kind="dino", device="cpu")) == f"{DINO} (mean-pooled)"
    with pytest.raises(ValueError, match="pooling is a DINO option"):
        load_evaluator(CLIP_L14, kind="clip", pooling="cls")


def test_minimal_download_is_enough_for_diffusers(offline_sd15_cache, tmp_path, monkeypatch):
    """After `hf download SD15 --include ...` the cache records the whole repository's listing (trees/) but holds
    only the included files; diffusers checks the files it wants against that listing. It loads: the patterns
    cover every file diffusers asks for (fp32 safetensors, safety_checker=None)."""
    src = offline_sd15_cache["cache_dir"] / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    repo = tmp_path / "hub" / src.name
    shutil.copytree(src, repo, symlinks=True)
    tree_path = repo / "trees" / f"{offline_commit(SD15)}.json"
    tree = json.loads(tree_path.read_text())
    for name in SD15_REPO_FILES:
        tree["files"].setdefault(name, {"size": 1, "blob_id": "0" * 40})
    tree_path.write_text(json.dumps(tree))
    point_hub_cache(monkeypatch, tmp_path / "hub")
    assert load_pipeline(SD15, device="cpu").unet is not None
    (repo / "snapshots" / offline_commit(SD15) / "feature_extractor" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelNotAvailableError, match="hf download"):  # one wanted file short: no load
        load_pipeline(SD15, device="cpu")


def test_an_id_missing_from_the_cache_names_the_download(offline_sd15_cache):
    missing = "stabilityai/stable-diffusion-2-1"
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(missing)
    msg = str(info.value)
    assert missing in msg and f"`hf download {missing}`" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "huggingface-cli" not in msg


@pytest.mark.parametrize("hub_id,kind", [(SD15, None), (CLIP_L14, "clip"), (DINO, "dino"),
                                         (DINO_DREAMBENCH, "dino")])
def test_known_ids_missing_name_their_minimal_download(empty_hub_cache, hub_id, kind):
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(hub_id) if kind is None else load_evaluator(hub_id, kind=kind)
    msg = str(info.value)
    assert hub_id in msg and download_command(hub_id) in msg and "--include" in msg
    assert HUB_MODELS[hub_id].size in msg and not is_cached(hub_id)
