"""Plain helpers of the tests, imported normally (`from tests.helpers import D, make_tiny_sd_pipeline, new_ax`).
The fixtures built on them live in the conftest.py files."""
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
import torch

from persviz.paths import SHAPESWORLD_DIR

D = 32  # width of the tiny pipeline's text encoder (its token embeddings)


def make_tiny_sd_pipeline():
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


def random_vector(seed, n=None, norm=3.0):
    """A seeded random vector of width D (or n of them, rows) of the given norm."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(*((n,) if n else ()), D, generator=g)
    return norm * v / v.norm(dim=-1, keepdim=True)


def new_ax():
    """(fig, ax): a Figure outside pyplot with one subplot."""
    fig = Figure()
    return fig, fig.add_subplot()


def hand_slerp(v, c, rotation, scale):
    """Eq. 1 written out (docs/tea.md §2), float64: both rescaled to m = (1 - scale)|v| + scale|c|, then the SLERP
    sin((1 - r) theta) / sin(theta) v' + sin(r theta) / sin(theta) c' with theta = arccos(<v, c> / |v||c|) (a linear
    blend when v and c are parallel)."""
    v, c = v.double(), c.double()
    m = (1 - scale) * v.norm() + scale * c.norm()
    u, w = v / v.norm(), c / c.norm()
    theta = math.acos(float((u @ w).clamp(-1, 1)))
    if math.sin(theta) < 1e-6:
        return m * ((1 - rotation) * u + rotation * w)
    return m * (math.sin((1 - rotation) * theta) * u + math.sin(rotation * theta) * w) / math.sin(theta)


def photo_folder(folder: Path, n: int = 2, size: int = 64) -> Path:
    """A folder of n flat gray PNG 'photos' (levels 0, 90, ...) for the training commands' tests."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 90 * i, np.uint8)).save(folder / f"p{i}.png")
    return folder
