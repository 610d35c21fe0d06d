"""build_sd15_pipeline(small=True): SD 1.5's architecture at reduced widths, 64 px by default."""
import numpy as np
import pytest
import torch

from persviz.sd15 import SMALL_CHANNELS, SMALL_SIDE, SMALL_TEXT_WIDTH, build_sd15_pipeline, sd15_component_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_small_configs_keep_the_architecture():
    full, small = sd15_component_configs(), sd15_component_configs(small=True)
    for name in ("unet", "vae"):
        for key in ("down_block_types", "up_block_types", "layers_per_block", "in_channels", "out_channels",
                    "norm_num_groups", "act_fn"):
            assert small[name].get(key) == full[name].get(key), (name, key)
        assert tuple(small[name]["block_out_channels"]) == SMALL_CHANNELS
        assert len(small[name]["block_out_channels"]) == len(full[name]["block_out_channels"])
    assert small["unet"]["attention_head_dim"] == full["unet"]["attention_head_dim"]
    assert small["unet"]["cross_attention_dim"] == small["text_encoder"]["hidden_size"] == SMALL_TEXT_WIDTH
    for key in ("num_hidden_layers", "vocab_size", "max_position_embeddings", "hidden_act", "eos_token_id"):
        assert small["text_encoder"][key] == full["text_encoder"][key], key
    assert small["unet"]["sample_size"] * 8 == small["vae"]["sample_size"] == SMALL_SIDE
    assert full["unet"]["block_out_channels"] == [320, 640, 1280, 1280]  # the shipped dicts are left as they were


def test_small_pipeline_generates_64px_and_is_seeded():
    state = torch.random.get_rng_state()
    pipe = build_sd15_pipeline(small=True, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    n = sum(p.numel() for c in (pipe.unet, pipe.vae, pipe.text_encoder) for p in c.parameters())
    assert 1e6 < n < 2e7 and pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 8
    out = pipe("a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    again = build_sd15_pipeline(small=True, seed=3)
    assert torch.equal(pipe.unet.conv_in.weight, again.unet.conv_in.weight)
    assert not torch.equal(pipe.unet.conv_in.weight, build_sd15_pipeline(small=True, seed=4).unet.conv_in.weight)


def test_small_is_for_random_weights_only():
    with pytest.raises(ValueError, match="random weights"):
        build_sd15_pipeline(random_weights=False, small=True)
