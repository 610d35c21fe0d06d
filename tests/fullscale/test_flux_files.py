"""Flux embedding files against the offline FLUX.1-dev (clip_l 32 wide, T5 48): diffusers' pivotal-tuning layout
(``clip_l`` + ``t5``, train_dreambooth_lora_flux_advanced.py) and ComfyUI's (``t5xxl``, with or without ``clip_l``)
read, inspected per encoder against the pipeline's own matrices, and fixed into the same layout, the fixed file
loading (as the advanced script's model card loads it) to the images tea() gives; files and models of other families
refused with a sentence naming both; training Textual Inversion, DreamBooth-LoRA and Custom Diffusion on Flux refused
with their sentences."""
import numpy as np
import pytest
import safetensors.torch
import torch

from persviz.cli import main
from persviz.embedding_files import EmbeddingFileError, read_embedding_file
from persviz.hub_models import FLUX_DEV, SD15, SDXL_BASE
from persviz.loading import load_pipeline
from persviz.tea.pipeline import tea
from tests.helpers import hand_slerp, photo_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flux_file(path, layout="flux", seed=0, dtype=torch.float32):
    """A learned token of 2 rows per encoder (norm about 8: drifted), in a Flux layout; {encoder: rows}."""
    g = torch.Generator().manual_seed(seed)
    rows = {"clip_l": 8 * torch.randn(2, 32, generator=g), "t5": 8 * torch.randn(2, 48, generator=g)}
    keys = {"flux": {"clip_l": "clip_l", "t5": "t5"}, "comfyui": {"clip_l": "clip_l", "t5": "t5xxl"},
            "comfyui-t5": {"t5": "t5xxl"}}[layout]
    safetensors.torch.save_file({k: rows[e].to(dtype) for e, k in keys.items()}, str(path),
                                metadata={"modelspec.title": "mine"})
    return {e: rows[e].to(dtype) for e in keys}


@pytest.mark.parametrize("layout,fmt", [("flux", "flux"), ("comfyui", "flux-comfyui"), ("comfyui-t5", "flux-comfyui")])
def test_flux_files_are_read_per_encoder(tmp_path, layout, fmt):
    rows = flux_file(tmp_path / "mine.safetensors", layout)
    f = read_embedding_file(tmp_path / "mine.safetensors")
    assert f.format == fmt and f.per_encoder and f.family == "FLUX.1" and f.token == "mine"
    assert sorted(f.parts) == sorted(rows) and all(torch.equal(f.parts[k], rows[k]) for k in rows)


def test_persviz_inspect_diagnoses_a_flux_file_per_encoder_against_the_pipelines_rows(offline_sd15_cache, tmp_path,
                                                                                        capsys):
    rows = flux_file(tmp_path / "mine.safetensors")
    reports = main(["inspect", str(tmp_path / "mine.safetensors"), "--model", FLUX_DEV, "--class-word", "teapot"])
    out = capsys.readouterr().out
    assert [(r.encoder, r.width) for r in reports] == [("clip_l", 32), ("t5", 48)]
    assert "text encoder clip_l 32 wide" in out and "text encoder t5 48 wide" in out
    pipe = load_pipeline(FLUX_DEV, device="cpu")  # the reference: the pipeline diffusers loads, its own matrices
    c = {"clip_l": pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("teapot</w>")],
         "t5": pipe.text_encoder_2.get_input_embeddings().weight[
             pipe.tokenizer_2("teapot", add_special_tokens=False).input_ids].mean(dim=0)}  # five T5 tokens: the mean
    for r in reports:
        for i in range(2):
            v = rows[r.encoder][i]
            assert r.rows[i].norm == pytest.approx(float(v.norm()), rel=1e-5)
            assert r.rows[i].ratio == pytest.approx(float(v.norm() / c[r.encoder].norm()), rel=1e-5)
            assert r.rows[i].cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(v, c[r.encoder], 0)),
                                                     abs=1e-5)
    flux_file(tmp_path / "t5only.safetensors", "comfyui-t5")
    only = main(["inspect", str(tmp_path / "t5only.safetensors"), "--model", FLUX_DEV])
    assert only.encoder == "t5" and only.width == 48  # ComfyUI's t5xxl alone: T5 diagnosed (one report)


@pytest.mark.parametrize("layout,dtype", [("flux", torch.float32), ("comfyui", torch.float16)])
def test_persviz_fix_writes_a_flux_file_in_its_layout_that_gives_teas_images(offline_sd15_cache, tmp_path, layout,
                                                                              dtype):
    rows = flux_file(tmp_path / "mine.safetensors", layout, dtype=dtype)
    main(["fix", str(tmp_path / "mine.safetensors"), "--class-word", "teapot", "--out",
          str(tmp_path / "fixed.safetensors"), "--model", FLUX_DEV, "--rotation", "0.2", "--scale", "0.5"])
    written = safetensors.torch.load_file(str(tmp_path / "fixed.safetensors"))
    original = safetensors.torch.load_file(str(tmp_path / "mine.safetensors"))
    assert sorted(written) == sorted(original) and all(v.dtype == dtype for v in written.values())
    with safetensors.safe_open(str(tmp_path / "fixed.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.title"] == "mine"  # the metadata kept
    t5_key = "t5" if layout == "flux" else "t5xxl"
    pipe = load_pipeline(FLUX_DEV, device="cpu")
    c_l = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("teapot</w>")].detach()
    c_t = pipe.text_encoder_2.get_input_embeddings().weight[
        pipe.tokenizer_2("teapot", add_special_tokens=False).input_ids].detach().mean(dim=0)
    for i in range(2):  # Eq. 1 written out, each row toward its own encoder's class word
        torch.testing.assert_close(written["clip_l"][i].double(), hand_slerp(rows["clip_l"][i].float(), c_l, 0.2, 0.5)
                                   .to(dtype).double(), atol=1e-6, rtol=0)
        torch.testing.assert_close(written[t5_key][i].double(), hand_slerp(rows["t5"][i].float(), c_t, 0.2, 0.5)
                                   .to(dtype).double(), atol=1e-6, rtol=0)
    # loaded as the advanced script's model card loads a Flux embedding, one part per encoder
    tokens = ["<s0>", "<s1>"]
    fixed_pipe = load_pipeline(FLUX_DEV, device="cpu")
    fixed_pipe.load_textual_inversion(written["clip_l"].float(), token=tokens, text_encoder=fixed_pipe.text_encoder,
                                      tokenizer=fixed_pipe.tokenizer)
    fixed_pipe.load_textual_inversion(written[t5_key].float(), token=tokens, text_encoder=fixed_pipe.text_encoder_2,
                                      tokenizer=fixed_pipe.tokenizer_2)
    pipe.load_textual_inversion(rows["clip_l"].float(), token=tokens, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(rows["t5"].float(), token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    kw = dict(prompt="a photo of <s0> <s1>", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
              output_type="np")
    mine = fixed_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    with tea(pipe, "<s0>", "teapot", 0.2, 0.5):  # tea() on the first row's token in both encoders ...
        with tea(pipe, "<s1>", "teapot", 0.2, 0.5):  # ... and the second's
            theirs = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(mine, theirs, atol=1e-3 if dtype == torch.float16 else 1e-5)
    assert np.abs(mine - plain).max() > 1e-4  # the fix changed the image: the comparison can fail


def test_files_and_models_of_other_families_are_refused_naming_both(offline_sd15_cache, tmp_path):
    safetensors.torch.save_file({"<cat>": torch.ones(1, 32)}, str(tmp_path / "sd1.safetensors"))
    safetensors.torch.save_file({"clip_l": torch.ones(1, 32), "clip_g": torch.ones(1, 48)},
                                str(tmp_path / "xl.safetensors"))
    flux_file(tmp_path / "flux.safetensors")
    with pytest.raises(SystemExit, match="a Stable Diffusion 1.x-style embedding\\) but black-forest-labs/FLUX.1-dev "
                                         "is a FLUX.1-style model with 2 text encoders \\(clip_l 32 wide, t5 48 "
                                         "wide\\)"):
        main(["inspect", str(tmp_path / "sd1.safetensors"), "--model", FLUX_DEV])
    with pytest.raises(SystemExit, match="xl.safetensors is an SDXL embedding \\(clip_l \\[1, 32\\], clip_g "
                                         "\\[1, 48\\]\\) "
                                         f"but {FLUX_DEV} is a FLUX.1 model .*--model {SDXL_BASE}"):
        main(["inspect", str(tmp_path / "xl.safetensors"), "--model", FLUX_DEV])
    with pytest.raises(SystemExit, match="flux.safetensors is a FLUX.1 embedding .* is an SDXL model "
                                         f".*--model {FLUX_DEV}"):
        main(["inspect", str(tmp_path / "flux.safetensors"), "--model", SDXL_BASE])
    with pytest.raises(SystemExit, match="flux.safetensors is a FLUX.1 embedding .* one 32-wide text encoder .*"
                                         f"--model {FLUX_DEV}"):
        main(["inspect", str(tmp_path / "flux.safetensors"), "--model", SD15])
    for name, what in (("sd1", "Stable Diffusion 1.x-style embedding\\) but the model is a FLUX.1-style model"),
                       ("xl", "is an SDXL embedding .* is a FLUX.1 model")):
        with pytest.raises(SystemExit, match=what):
            main(["fix", str(tmp_path / f"{name}.safetensors"), "--class-word", "dog", "--out",
                  str(tmp_path / f"{name}-fixed.safetensors"), "--model", FLUX_DEV])
        assert not (tmp_path / f"{name}-fixed.safetensors").exists()
    with pytest.raises(EmbeddingFileError, match="is a FLUX.1 embedding .* is an SDXL model"):
        from persviz.tea.fix_file import fix_embedding
        from persviz.tea.inspect_file import load_text_stack
        fix_embedding(tmp_path / "flux.safetensors", load_text_stack(SDXL_BASE), "dog", tmp_path / "o.safetensors")


@pytest.mark.parametrize("method,why", [
    ("textual-inversion", "persviz has no textual_inversion recipe for FLUX.1 \\(persviz reads, inspects and fixes Flux "
                          "Textual Inversion files \\(clip_l \\+ t5\\) but does not train them; .*\\); train "
                          "dreambooth on it"),
    ("custom-diffusion", "persviz has no custom_diffusion recipe for FLUX.1 \\(Custom Diffusion fine-tunes a UNet's "
                         "cross-attention keys and values, which Flux's joint-attention transformer does not have\\)"),
])
def test_training_refused_methods_on_flux_says_why(offline_sd15_cache, tmp_path, method, why):
    photos = photo_folder(tmp_path / "photos")
    with pytest.raises(SystemExit, match=why):
        main(["train", method, "--model", FLUX_DEV, "--images", str(photos), "--class-word", "dog",
              "--placeholder", "<my-dog>", "--out", str(tmp_path / "concept")])
    assert not (tmp_path / "concept" / method.replace("-", "_")).exists()
