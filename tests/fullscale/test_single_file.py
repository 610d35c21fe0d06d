"""Single-file checkpoints (``--model path.safetensors``, the layout A1111, ComfyUI and Forge load) for SD 1.x and
SDXL: the family found from the state-dict keys, loaded by diffusers' ``from_single_file`` with the configuration of
the family's Hub id from the offline cache only, the same weights as the diffusers folder they were written from
(tests/single_file_checkpoints.py follows diffusers' own converters); a missing configuration names its `hf
download` line, and bad files get one sentence."""
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

from persviz.families import FAMILIES, UnsupportedModelError, assemble_pipeline, checkpoint_family, family_of
from persviz.hub_models import SD15, SDXL_BASE, WEIGHT_SUFFIXES, config_download_command
from persviz.loading import ModelNotAvailableError, load_pipeline
from persviz.methods import get_method
from tests.fullscale.conftest import point_hub_cache
from tests.single_file_checkpoints import write_single_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = {"sd1": SD15, "sdxl": SDXL_BASE}


@pytest.fixture(scope="module")
def single_files(offline_sd15_cache, tmp_path_factory):
    """{family name: a single-file checkpoint written from that family's test model in the offline cache}."""
    folder = tmp_path_factory.mktemp("single_files")
    snaps = offline_sd15_cache["snapshots"]
    return {name: write_single_file(snaps[hub], folder / f"{name}.safetensors", sdxl=name == "sdxl")
            for name, hub in IDS.items()}


def same_weights(a, b, parts):
    for name in parts:
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("name", ["sdxl", "sd1"])
def test_a_single_file_checkpoint_loads_as_its_diffusers_folder(single_files, name):
    path = single_files[name]
    assert checkpoint_family(path) is FAMILIES[name]
    pipe = assemble_pipeline(str(path), device="cpu")
    folder = assemble_pipeline(IDS[name], device="cpu")
    assert type(pipe) is type(folder) and family_of(pipe) is FAMILIES[name]
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if name == "sdxl" else ())
    same_weights(pipe, folder, parts)
    assert type(pipe.scheduler) is type(folder.scheduler) and pipe.vae.use_slicing  # prepared by its family
    kw = dict(prompt="a photo of a dog", num_inference_steps=2, output_type="np")
    mine = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    theirs = folder(**kw, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(mine, theirs, atol=1e-5)  # the same weights (above); float noise of the load path


def test_a_half_precision_file_loads_in_the_dtype_asked_for(single_files, offline_sd15_cache, tmp_path):
    half = write_single_file(offline_sd15_cache["snapshots"][SDXL_BASE], tmp_path / "half.safetensors", sdxl=True,
                             half=True)
    pipe = assemble_pipeline(str(half), device="cpu", dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder_2.dtype == torch.float32


def test_the_configuration_alone_is_what_the_cache_needs(single_files, offline_sd15_cache, tmp_path, monkeypatch):
    """What config_download_command fetches (no weights) is enough: a cache of those files alone loads the file."""
    from persviz.sd15 import file_into_cache
    staged = tmp_path / "staged"
    snap = offline_sd15_cache["snapshots"][SDXL_BASE]
    for f in snap.rglob("*"):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            (staged / f.relative_to(snap)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, staged / f.relative_to(snap))
    cache = tmp_path / "configs_only"
    file_into_cache(cache, SDXL_BASE, staged)
    assert not list(cache.rglob("*.safetensors"))
    point_hub_cache(monkeypatch, cache)
    pipe = assemble_pipeline(str(single_files["sdxl"]), device="cpu")
    assert family_of(pipe) is FAMILIES["sdxl"]
    cmd = config_download_command(SDXL_BASE)
    assert "--include model_index.json" in cmd and "tokenizer_2/*" in cmd and ".safetensors" not in cmd


@pytest.mark.parametrize("name", ["sdxl", "sd1"])
def test_a_missing_configuration_names_the_model_and_its_download_line(single_files, empty_hub_cache, name):
    with pytest.raises(ModelNotAvailableError) as info:
        assemble_pipeline(str(single_files[name]), device="cpu")
    msg = str(info.value)
    assert f"{FAMILIES[name].label} single-file checkpoint" in msg and IDS[name] in msg
    assert config_download_command(IDS[name]) in msg and "\n" not in msg


def test_bad_files_get_one_sentence(tmp_path, single_files):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint at all\n")
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, pickled)
    embedding = tmp_path / "token.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}, str(embedding))
    sd2 = tmp_path / "sd2.safetensors"
    safetensors.torch.save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 8),
                                 "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(sd2))
    cases = {text: "is not a safetensors checkpoint", pickled: "is a pickled torch checkpoint",
             embedding: "no keys of a model family persviz loads from one file",
             sd2: "no keys of a model family persviz loads from one file",
             tmp_path / "missing.safetensors": "no checkpoint file at"}
    for path, why in cases.items():
        with pytest.raises(UnsupportedModelError, match=why) as info:
            assemble_pipeline(str(path), device="cpu")
        assert "\n" not in str(info.value)
    with pytest.raises(UnsupportedModelError, match="cond_stage_model.transformer.*conditioner.embedders.1."):
        checkpoint_family(sd2)
    data = single_files["sd1"].read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for cut in (4096, header + 100):  # in the header; after it, in the tensors
        truncated = tmp_path / f"truncated{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(UnsupportedModelError, match="is a damaged or incomplete safetensors file"):
            assemble_pipeline(str(truncated), device="cpu")


def test_load_pipeline_points_a_file_to_the_assembler(single_files):
    with pytest.raises(ModelNotAvailableError, match="single-file checkpoints are loaded by "
                                                     "persviz.families.assemble_pipeline"):
        load_pipeline(str(single_files["sd1"]), device="cpu")


def test_persviz_inspect_takes_a_single_file_sdxl_model(single_files, tmp_path, capsys):
    from persviz.cli import main
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 48, generator=g)},
                                str(tmp_path / "mytoken.safetensors"))
    reports = main(["inspect", str(tmp_path / "mytoken.safetensors"), "--model", str(single_files["sdxl"]),
                    "--class-word", "dog"])
    assert [(r.encoder, r.width) for r in reports] == [("clip_l", 32), ("clip_g", 48)]


def test_a_concept_trains_on_a_single_file_sd1_model_and_records_its_path(single_files, tmp_path):
    from PIL import Image

    from persviz.concept_folder import read_concept
    from persviz.trainers.concept_runs import train_concept
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(photos / f"p{i}.png")
    run = train_concept("ti", photos, "dog", "<v>", tmp_path / "concept", model=str(single_files["sd1"]), steps=2,
                        save_every=1, progress=False)
    assert read_concept(tmp_path / "concept").model == str(single_files["sd1"].resolve())
    assert [k for k, _ in get_method("ti").snapshots(run.run_dir)] == [1, 2]
