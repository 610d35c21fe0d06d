"""SD 1.5's shipped configs load into the real classes with SD 1.5's sizes; the tokenizer is CLIP's."""
import numpy as np
import pytest
import torch

from persviz.sd15 import VOCAB_SIZE, build_sd15_pipeline, clip_bpe_vocab, load_sd15_tokenizer, sd15_config_dir

# public counts for SD 1.5 (sources in data/sd15/README.md)
UNET_PARAMS, VAE_PARAMS, TEXT_PARAMS = 859_520_964, 83_653_863, 123_060_480
SENTENCES = ["a photo of a dog", "A man wearing glasses, playing guitar on a beach at sunset!",
             "naïve café — 3.5 déjà-vu's", "<v*> sks man riding a bicycle", "tabs\tand   spaces"]


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_configs_build_the_real_classes_with_sd15_sizes():
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = sd15_config_dir()
    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert _n(unet) == pytest.approx(UNET_PARAMS, rel=0.005)
    assert _n(vae) == pytest.approx(VAE_PARAMS, rel=0.005)
    assert _n(text) == pytest.approx(TEXT_PARAMS, rel=0.005)
    cfg = text.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 12, 12)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (3072, 49408, 77)
    assert (cfg.hidden_act, cfg.projection_dim) == ("quick_gelu", 768)
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64 and vae.config.sample_size == 512
    sched = PNDMScheduler.from_pretrained(folder / "scheduler")
    assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.012)
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    assert sched.config.steps_offset == 1 and sched.config.skip_prk_steps and not sched.config.set_alpha_to_one


def test_model_index_names_the_sd15_components():
    import json
    index = json.loads((sd15_config_dir() / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]


def test_shipped_bpe_files_are_the_ones_built_from_open_clip(tmp_path):
    from persviz.sd15 import write_clip_bpe_files
    write_clip_bpe_files(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (sd15_config_dir() / "tokenizer" / name).read_bytes(), name
    encoder, merges = clip_bpe_vocab()
    assert len(encoder) == VOCAB_SIZE and len(merges) == 48894
    assert encoder["<|startoftext|>"] == 49406 and encoder["<|endoftext|>"] == 49407


def test_tokenizer_matches_open_clip():
    import open_clip
    tok, reference = load_sd15_tokenizer(), open_clip.get_tokenizer("ViT-L-14")
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>" and len(tok) == VOCAB_SIZE
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    for text in SENTENCES:
        ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        ref = reference([text])[0].tolist()
        end = ref.index(49407) + 1
        assert ids[:end] == ref[:end], text  # same tokens up to and including EOS
        assert set(ids[end:]) <= {49407} and set(ref[end:]) <= {0}  # SD pads with EOS, open_clip with 0


def test_sample_size_must_fit_the_unet():
    with pytest.raises(ValueError, match="multiple of 64"):
        build_sd15_pipeline(sample_size=100)


@pytest.mark.slow
def test_random_sd15_pipeline_generates_64px_on_cpu():
    pipe = build_sd15_pipeline(sample_size=64, device="cpu", seed=0)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
    assert _n(pipe.unet) == UNET_PARAMS and _n(pipe.vae) == VAE_PARAMS and _n(pipe.text_encoder) == TEXT_PARAMS
    out = pipe("a photo of a dog", num_inference_steps=1, guidance_scale=7.5, output_type="np",
               generator=torch.Generator("cpu").manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.slow
def test_full_scale_code_path_end_to_end_on_random_sd15(tmp_path):
    """SD 1.5-shaped components (random weights): TI steps with snapshots, the shift tracker, token- and
    prompt-level TEA and generation at 64x64 run the very functions the notebooks call at full scale."""
    from persviz.generation import generate, generate_from_embeds
    from persviz.tea.pipeline import encode_prompt_level, tea
    from persviz.tea.tracker import track_semantic_shift
    from persviz.trainers import TextualInversionConfig, train_textual_inversion
    pipe = build_sd15_pipeline(sample_size=64, device="cpu", seed=0)
    pipe.set_progress_bar_config(disable=True)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    res = train_textual_inversion(pipe, images, TextualInversionConfig(placeholder="<v*>", initializer="dog", steps=2, save_every=1),
                                  tmp_path / "textual_inversion", progress=False)
    assert len(res.loss_history) == 2 and np.isfinite(res.loss_history).all()
    track = track_semantic_shift(pipe, tmp_path / "textual_inversion", ["a {} on a beach", "a {} in the snow", "a {} at night"],
                                 ["a photo of a {}", "a {}", "an image of a {}"], progress=False)
    assert track["step"] == [1, 2] and all(np.isfinite(track["inter_l2"]))
    plain = generate(pipe, ["a <v*> on a beach"], steps=1, guidance=7.5)
    with tea(pipe, "<v*>", "dog"):
        adjusted = generate(pipe, ["a <v*> on a beach"], steps=1, guidance=7.5)
    assert plain.shape == adjusted.shape == (1, 64, 64, 3) and not np.array_equal(plain, adjusted)
    pe, ne = encode_prompt_level(pipe, "a photo of sks dog", "a photo of dog", placeholder="sks", class_word="dog")
    assert pe.shape == (1, 77, 768)
    assert generate_from_embeds(pipe, pe, ne, steps=1).shape == (1, 64, 64, 3)
