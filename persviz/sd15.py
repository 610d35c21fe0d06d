"""Stable Diffusion 1.5 without downloads: its published configs and tokenizer ship in data/sd15/.

`build_sd15_pipeline()` builds SD 1.5-shaped components from those configs with **random weights**
(real architecture, real tokenizer, ~1.07 B parameters, noise for images). It exists so that tests and
notebooks can exercise the full-scale code path offline; random weights show nothing about a model.
For the real checkpoint, pass `random_weights=False` (local cache, a local folder or the Hub, through
`persviz.loading.load_pipeline`).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

from persviz.paths import DATA_DIR

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # OpenAI CLIP's SimpleTokenizer keeps merges[1:49152-256-2+1]
VOCAB_SIZE = 49408
LATENT_FACTOR = 8  # SD 1.5's VAE downsamples 512 px to 64 latents


def sd15_config_dir() -> Path:
    """The folder with SD 1.5's model_index.json and component configs (no weights)."""
    return DATA_DIR / "sd15"


def _default_bpe() -> Path:
    """The BPE merges file that ships inside the installed open_clip package."""
    import open_clip
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode symbols."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_bpe_vocab(bpe_path: Optional[Union[str, Path]] = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token->id map (49408 tokens) and its 48894 merges, built exactly as OpenAI's SimpleTokenizer does.

    Args:
        bpe_path: the gzipped BPE file; default the copy inside the installed open_clip package.
    """
    with gzip.open(bpe_path or _default_bpe()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != VOCAB_SIZE or len(merges) != N_MERGES:
        raise ValueError(f"{bpe_path or _default_bpe()} gives {len(encoder)} tokens and {len(merges)} merges, "
                         f"not CLIP's {VOCAB_SIZE} and {N_MERGES}")
    return encoder, merges


def write_clip_bpe_files(folder: Union[str, Path], bpe_path: Optional[Union[str, Path]] = None) -> Path:
    """Write vocab.json and merges.txt byte for byte as transformers' CLIPTokenizer.save_vocabulary writes them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder, merges = clip_bpe_vocab(bpe_path)
    (folder / "vocab.json").write_text(json.dumps(encoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def load_sd15_tokenizer() -> "CLIPTokenizer":
    """SD 1.5's CLIPTokenizer from the shipped files (same ids as open_clip's ViT-L-14 tokenizer)."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(sd15_config_dir() / "tokenizer")


def _random_components() -> dict:
    """SD 1.5's UNet, VAE and text encoder with fresh random weights, plus its tokenizer and scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = sd15_config_dir()
    return {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        "tokenizer": load_sd15_tokenizer(),
        "scheduler": PNDMScheduler.from_pretrained(folder / "scheduler"),
    }


def build_sd15_pipeline(random_weights: bool = True, sample_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                        seed: int = 0) -> "StableDiffusionPipeline":
    """An SD 1.5 StableDiffusionPipeline (no safety checker); random weights by default, for code paths only.

    Args:
        random_weights: True builds every component from the shipped configs with random weights, offline.
            False loads the real checkpoint via `persviz.loading.load_pipeline` (cache, folder or Hub).
        sample_size: default image side in pixels (a multiple of 64); None keeps SD 1.5's 512. 64 makes
            generation cheap enough for a CPU: every weight keeps its full SD 1.5 shape, only the default
            height/width change (equivalently pass height=64, width=64 to the call).
        dtype, device: where the pipeline lives.
        seed: seeds the random initialisation (the global torch RNG is left as it was).
    """
    from diffusers import StableDiffusionPipeline  # noqa: F811 (runtime import; the module one is for typing)

    if sample_size is not None and (sample_size <= 0 or sample_size % (LATENT_FACTOR * 8)):
        raise ValueError(f"sample_size must be a positive multiple of 64 pixels (8 latents), got {sample_size}")
    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts = _random_components()
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device=torch.device(device), dtype=dtype)
    else:
        from persviz.loading import SD15, load_pipeline
        pipe = load_pipeline(SD15, device=str(device), dtype=dtype)
    if sample_size is not None:  # after construction: the pipeline resets a UNet sample_size < 64 from old configs
        pipe.unet.register_to_config(sample_size=sample_size // LATENT_FACTOR)
    return pipe
