"""SDXL base under its real Hub id in the offline cache (persviz.families.sdxl.write_test_cache: random weights,
clip_l 32 wide and clip_g 48): loaded by persviz as diffusers' own StableDiffusionXLPipeline loads it, prepared by
its family, and generating at 64 px; a missing SDXL names its `hf download` line."""
import numpy as np
import pytest
import torch

from persviz.families import FAMILIES, assemble_pipeline, family_of, text_stack
from persviz.hub_models import SDXL_BASE, download_command
from persviz.loading import ModelNotAvailableError, load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sdxl_loads_offline_as_diffusers_loads_it(offline_sd15_cache):
    from diffusers import StableDiffusionXLPipeline
    pipe = load_pipeline(SDXL_BASE, device="cpu")
    ref = StableDiffusionXLPipeline.from_pretrained(offline_sd15_cache["snapshots"][SDXL_BASE], dtype=torch.float32)
    assert type(pipe) is StableDiffusionXLPipeline and family_of(pipe) is FAMILIES["sdxl"]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert [(e.name, e.width) for e in text_stack(pipe)] == [("clip_l", 32), ("clip_g", 48)]
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer("a dog").input_ids == pipe.tokenizer_2("a dog").input_ids  # the same CLIP BPE


def test_the_assembler_prepares_sdxl_and_it_generates_as_diffusers_does(offline_sd15_cache):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    pipe = assemble_pipeline(SDXL_BASE, device="cpu")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and pipe.vae.use_slicing
    ref = StableDiffusionXLPipeline.from_pretrained(offline_sd15_cache["snapshots"][SDXL_BASE], dtype=torch.float32)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)  # textual_inversion_sdxl.py's
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a dog", num_inference_steps=2, output_type="np")
    mine = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    theirs = ref(**kw, generator=torch.Generator().manual_seed(0)).images
    assert mine.shape == (1, 64, 64, 3) and np.isfinite(mine).all()
    np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_a_missing_sdxl_names_its_download_line(empty_hub_cache):
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(SDXL_BASE, device="cpu")
    msg = str(info.value)
    assert SDXL_BASE in msg and download_command(SDXL_BASE) in msg and "HF_HUB_OFFLINE=1" in msg
    assert "--include 'tokenizer_2/*'" in msg and "text_encoder_2/model.safetensors" in msg


def test_persviz_inspect_diagnoses_an_sdxl_file_per_encoder_against_the_cached_sdxl(offline_sd15_cache, tmp_path,
                                                                                     capsys):
    import json

    import safetensors.torch
    from persviz.cli import main
    g = torch.Generator().manual_seed(0)
    parts = {"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 48, generator=g)}
    safetensors.torch.save_file(parts, str(tmp_path / "mytoken.safetensors"))
    reports = main(["inspect", str(tmp_path / "mytoken.safetensors"), "--model", SDXL_BASE, "--class-word", "dog"])
    out = capsys.readouterr().out
    assert [r.encoder for r in reports] == ["clip_l", "clip_g"] and [r.width for r in reports] == [32, 48]
    assert "text encoder clip_l 32 wide" in out and "text encoder clip_g 48 wide" in out
    pipe = load_pipeline(SDXL_BASE, device="cpu")  # the reference: the pipeline diffusers loads, its own matrices
    for r, (enc, tok) in zip(reports, ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))):
        c = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("dog</w>")]
        v = parts[r.encoder][0]
        assert r.rows[0].norm == pytest.approx(float(v.norm()), rel=1e-5)
        assert r.rows[0].ratio == pytest.approx(float(v.norm() / c.norm()), rel=1e-5)
        assert r.rows[0].cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(v, c, dim=0)), abs=1e-5)
    main(["inspect", str(tmp_path / "mytoken.safetensors"), "--model", SDXL_BASE, "--json"])
    assert [e["encoder"] for e in json.loads(capsys.readouterr().out)["encoders"]] == ["clip_l", "clip_g"]
    safetensors.torch.save_file({"<cat>": torch.ones(1, 32)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(SystemExit, match="Stable Diffusion 1.x-style embedding.*SDXL-style model"):
        main(["inspect", str(tmp_path / "sd1.safetensors"), "--model", SDXL_BASE])


def test_persviz_fix_against_sdxl_is_refused_naming_both_families(offline_sd15_cache, tmp_path):
    import safetensors.torch
    from persviz.cli import main
    safetensors.torch.save_file({"<cat>": torch.ones(1, 32)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(SystemExit, match="Stable Diffusion 1.x-style embedding\\) but the model is an SDXL-style model "
                       "with 2 text encoders \\(clip_l 32 wide, clip_g 48 wide\\); fix it against the SD 1.x model"):
        main(["fix", str(tmp_path / "sd1.safetensors"), "--class-word", "dog", "--out", str(tmp_path / "o.safetensors"),
              "--model", SDXL_BASE])
    assert not (tmp_path / "o.safetensors").exists()
