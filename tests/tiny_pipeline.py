"""A StableDiffusionPipeline with random tiny components for unit tests (diffusers' get_dummy_components()), and the
fixtures of the tests that train on it: import them into a test module (`from tiny_pipeline import base_pipe, ...`)."""
import copy

import pytest
import torch

from persviz.paths import SHAPESWORLD_DIR
from persviz.shapesworld import Obj, Scene, render_batch

D = 32


def tiny_pipe():
    """A StableDiffusionPipeline with random tiny components, as in diffusers' get_dummy_components()."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SHAPESWORLD_DIR / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=D, norm_num_groups=2,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=D, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer),
    ))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far slower with two when the cores are busy); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_pipe():
    """One tiny pipeline per test module; tests that change it take a copy (the `pipe` fixture)."""
    return tiny_pipe()


@pytest.fixture
def pipe(base_pipe):
    """A copy of base_pipe for one test."""
    return copy.deepcopy(base_pipe)


@pytest.fixture(scope="module")
def images():
    """Four 32x32 renders of one concept (a red striped square) on different backgrounds."""
    obj = Obj("square", "red", "striped", "large")
    return render_batch([Scene(obj, bg) for bg in ("gray", "white", "navy", "beige")], seed=0)
