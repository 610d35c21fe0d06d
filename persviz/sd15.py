"""Stable Diffusion 1.5 without downloads: its published configs and tokenizer ship in data/sd15/.

`build_sd15_pipeline()` builds SD 1.5-shaped components from those configs with **random weights**
(real architecture, real tokenizer, ~1.07 B parameters, noise for images). It exists so that tests and
notebooks can exercise the full-scale code path offline; random weights show nothing about a model.
For the real checkpoint, pass `random_weights=False` (local cache, a local folder or the Hub, through
`persviz.loading.load_pipeline`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

from persviz.io import write_json
from persviz.loading import CLIP_L14, DINO, DINO_DREAMBENCH, SD15, load_pipeline
from persviz.paths import DATA_DIR

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # OpenAI CLIP's SimpleTokenizer keeps merges[1:49152-256-2+1]
VOCAB_SIZE = 49408
LATENT_FACTOR = 8  # SD 1.5's VAE downsamples 512 px to 64 latents
SMALL_CHANNELS = (32, 64, 64, 64)  # small=True: UNet and VAE block widths (SD 1.5: 320-640-1280-1280, 128-256-512-512)
SMALL_TEXT_WIDTH = 32  # small=True: text-encoder width = UNet cross-attention dim (SD 1.5: 768)
SMALL_SIDE = 64  # small=True: default image side in pixels (8 latents)


def sd15_config_dir() -> Path:
    """The folder with SD 1.5's model_index.json and component configs (no weights)."""
    return DATA_DIR / "sd15"


def _default_bpe() -> Path:
    """The BPE merges file that ships inside the installed open_clip package."""
    import open_clip  # heavy: open_clip
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
    from transformers import CLIPTokenizer  # heavy: transformers
    return CLIPTokenizer.from_pretrained(sd15_config_dir() / "tokenizer")


def sd15_component_configs(small: bool = False) -> dict[str, dict]:
    """SD 1.5's UNet, VAE and text-encoder configs as dicts (from data/sd15/).

    small=True keeps SD 1.5's architecture (block types, depth, layers per block, 12 text layers, the real
    tokenizer's 49408-token vocabulary and 77 positions, VAE factor 8) and narrows every width: UNet and VAE channels
    SMALL_CHANNELS, text width SMALL_TEXT_WIDTH (= the UNet's cross-attention dim), default image side SMALL_SIDE px.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy: diffusers

    folder = sd15_config_dir()
    configs = {"unet": dict(UNet2DConditionModel.load_config(folder / "unet")),
               "vae": dict(AutoencoderKL.load_config(folder / "vae")),
               "text_encoder": json.loads((folder / "text_encoder" / "config.json").read_text())}
    if small:
        width = SMALL_TEXT_WIDTH
        configs["text_encoder"].update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=4,
                                       projection_dim=width)
        configs["unet"].update(block_out_channels=list(SMALL_CHANNELS), cross_attention_dim=width,
                               sample_size=SMALL_SIDE // LATENT_FACTOR)
        configs["vae"].update(block_out_channels=list(SMALL_CHANNELS), sample_size=SMALL_SIDE)
        for name in ("unet", "vae"):  # a new config: diffusers' own version (0.6.0 makes it reset a small sample_size)
            configs[name].pop("_diffusers_version", None)
    return configs


def _random_components(small: bool = False, with_tokenizer: bool = True) -> dict:
    """SD 1.5's UNet, VAE and text encoder with fresh random weights, plus its tokenizer and scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # heavy: diffusers
    from transformers import CLIPTextConfig, CLIPTextModel  # heavy: transformers

    folder, configs = sd15_config_dir(), sd15_component_configs(small)
    parts = {
        "unet": UNet2DConditionModel.from_config(configs["unet"]),
        "vae": AutoencoderKL.from_config(configs["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
        "scheduler": PNDMScheduler.from_pretrained(folder / "scheduler"),
    }
    if with_tokenizer:
        parts["tokenizer"] = load_sd15_tokenizer()
    return parts


def build_sd15_pipeline(random_weights: bool = True, sample_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                        seed: int = 0, small: bool = False) -> "StableDiffusionPipeline":
    """An SD 1.5 StableDiffusionPipeline (no safety checker); random weights by default, for code paths only.

    Args:
        random_weights: True builds every component from the shipped configs with random weights, offline.
            False loads the real checkpoint via `persviz.loading.load_pipeline` (cache, folder or Hub).
        sample_size: default image side in pixels (a multiple of 64); None keeps SD 1.5's 512. 64 makes
            generation cheap enough for a CPU: every weight keeps its full SD 1.5 shape, only the default
            height/width change (equivalently pass height=64, width=64 to the call).
        dtype, device: where the pipeline lives.
        seed: seeds the random initialisation (the global torch RNG is left as it was).
        small: random weights only; SD 1.5's architecture with reduced widths (`sd15_component_configs(small=True)`,
            about 6 M parameters) and 64 px images by default: fast enough for CPU tests of the full-scale code.
    """
    from diffusers import StableDiffusionPipeline  # noqa: F811 (runtime import; the module one is for typing)

    if sample_size is not None and (sample_size <= 0 or sample_size % (LATENT_FACTOR * 8)):
        raise ValueError(f"sample_size must be a positive multiple of 64 pixels (8 latents), got {sample_size}")
    if small and not random_weights:
        raise ValueError("small=True builds random weights; the real SD 1.5 has one size (random_weights=True)")
    if small and sample_size is None:
        sample_size = SMALL_SIDE
    if random_weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts = _random_components(small)
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device=torch.device(device), dtype=dtype)
    else:
        pipe = load_pipeline(SD15, device=str(device), dtype=dtype)
    if sample_size is not None:  # after construction: the pipeline resets a UNet sample_size < 64 from old configs
        pipe.unet.register_to_config(sample_size=sample_size // LATENT_FACTOR)
    return pipe


# ----------------------------------------------------------------------------- an offline Hugging Face cache

SD15_FEATURE_EXTRACTOR = {  # SD 1.5's feature_extractor/preprocessor_config.json (the safety checker's CLIP input)
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
CLIP_L14_PREPROCESSOR = {  # openai/clip-vit-large-patch14's preprocessor_config.json
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
DINOV2_PREPROCESSOR = {  # facebook/dinov2-base's preprocessor_config.json
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256}}
LFS_SUFFIXES = (".safetensors", ".bin")  # stored through Git LFS on the Hub: blobs named by their sha256


def clip_l14_config(small: bool = False):
    """transformers CLIPConfig of CLIP ViT-L/14 (text 768 x 12, vision 1024 x 24, patch 14, 224 px, projection 768);
    small=True: the same model type, vocabulary, positions, patch and image size, 32 wide and 2 layers deep."""
    from transformers import CLIPConfig  # heavy: transformers
    text = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
                pad_token_id=1, eos_token_id=2)
    vision = dict(image_size=224, patch_size=14, hidden_act="quick_gelu")
    if small:
        text.update(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        vision.update(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        projection = 32
    else:
        text.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        projection = 768
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection, logit_scale_init_value=2.6592)


def dinov2_base_config(small: bool = False):
    """transformers Dinov2Config of DINOv2-base (768 x 12, 12 heads, patch 14, 518 px positions);
    small=True: the same model type, patch and positions, 32 wide and 2 layers deep."""
    from transformers import Dinov2Config  # heavy: transformers
    width, layers, heads = (32, 2, 4) if small else (768, 12, 12)
    return Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                        image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)


DINO_VITS16_PREPROCESSOR = {  # facebook/dino-vits16's preprocessor_config.json
    "do_normalize": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "ViTImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 2,
    "size": {"height": 224, "width": 224}}


def dino_vits16_config(small: bool = False):
    """transformers ViTConfig of DINO ViT-S/16 (384 x 12, 6 heads, patch 16, 224 px); small=True: 32 wide, 2 deep."""
    from transformers import ViTConfig  # heavy: transformers
    width, layers, heads = (32, 2, 4) if small else (384, 12, 6)
    return ViTConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * width, image_size=224, patch_size=16, qkv_bias=True)


def _write_sd15_repo(folder: Path, small: bool) -> None:
    """SD 1.5's diffusers layout: model_index.json, scheduler, tokenizer, feature extractor, random-weight models."""
    source = sd15_config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "model_index.json", folder / "model_index.json")
    for sub in ("scheduler", "tokenizer"):
        shutil.copytree(source / sub, folder / sub)
    write_json(folder / "feature_extractor" / "preprocessor_config.json", SD15_FEATURE_EXTRACTOR, indent=2)
    parts = _random_components(small, with_tokenizer=False)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].save_pretrained(folder / name)


def _write_clip_repo(folder: Path, small: bool) -> None:
    """CLIP ViT-L/14's files: config and random weights, the real tokenizer files, the real preprocessor config."""
    from transformers import CLIPModel  # heavy: transformers
    CLIPModel(clip_l14_config(small)).save_pretrained(folder)
    tokenizer = load_sd15_tokenizer()  # the same BPE as openai/clip-vit-large-patch14
    for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"):
        shutil.copyfile(sd15_config_dir() / "tokenizer" / name, folder / name)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "preprocessor_config.json", CLIP_L14_PREPROCESSOR, indent=2)


def _write_dino_repo(folder: Path, small: bool) -> None:
    """DINOv2-base's files: config and random weights, the real preprocessor config."""
    from transformers import Dinov2Model  # heavy: transformers
    Dinov2Model(dinov2_base_config(small)).save_pretrained(folder)
    write_json(folder / "preprocessor_config.json", DINOV2_PREPROCESSOR, indent=2)


def _write_dino_vits16_repo(folder: Path, small: bool) -> None:
    """DINO ViT-S/16's files: config and random weights, the real preprocessor config."""
    from transformers import ViTModel  # heavy: transformers
    ViTModel(dino_vits16_config(small)).save_pretrained(folder)
    write_json(folder / "preprocessor_config.json", DINO_VITS16_PREPROCESSOR, indent=2)


def offline_commit(hub_id: str) -> str:
    """The 40-hex 'commit' under which `write_offline_hub_cache` files `hub_id` (not a real Hub commit)."""
    return hashlib.sha1(f"persviz offline random weights: {hub_id}".encode()).hexdigest()


def _file_ids(path: Path) -> tuple[str, Optional[str]]:
    """(git blob sha1, sha256 when the Hub would keep the file in LFS) of a file, read in chunks."""
    git, sha256 = hashlib.sha1(b"blob %d\0" % path.stat().st_size), hashlib.sha256()
    lfs = path.suffix in LFS_SUFFIXES
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            git.update(chunk)
            if lfs:
                sha256.update(chunk)
    return git.hexdigest(), sha256.hexdigest() if lfs else None


def file_into_cache(cache_dir: Path, hub_id: str, staged: Path) -> Path:
    """Move a staged repository folder into the cache as huggingface_hub lays it out; returns the snapshot path.

    models--org--name/blobs/<sha256 or git sha1>, snapshots/<commit>/<file> -> relative link to its blob,
    refs/main = the commit, trees/<commit>.json = the file listing (what `snapshot_download` records)."""
    repo = cache_dir / ("models--" + hub_id.replace("/", "--"))
    commit = offline_commit(hub_id)
    snapshot = repo / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for sub in ("blobs", "refs", "trees"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    listing = {}
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = path.relative_to(staged).as_posix()
        size = path.stat().st_size
        git_id, sha256 = _file_ids(path)
        blob = repo / "blobs" / (sha256 or git_id)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(blob))
        try:
            os.symlink(os.path.relpath(blob, link.parent), link)
        except OSError:  # no symlinks (e.g. Windows without developer mode): huggingface_hub then copies too
            shutil.copyfile(blob, link)
        listing[rel] = {"size": size, "blob_id": git_id} | ({"lfs_sha256": sha256, "lfs_size": size} if sha256 else {})
    (repo / "refs" / "main").write_text(commit)
    write_json(repo / "trees" / f"{commit}.json", {"format_version": 1, "files": listing}, indent=2)
    return snapshot


def write_offline_hub_cache(cache_dir: Union[str, Path], small: bool = True, seed: int = 0) -> dict[str, Path]:
    """Write SD 1.5, CLIP ViT-L/14, DINOv2-base and DINO ViT-S/16 with **random weights** into a Hugging Face cache.

    The folder gets the real Hub ids (`persviz.loading.SD15`, `CLIP_L14`, `DINO`, `DINO_DREAMBENCH`) in huggingface_hub's cache layout
    (models--org--name/{blobs, refs/main, snapshots/<40-hex commit>, trees}); SD 1.5 in the diffusers layout
    (model_index.json, scheduler, tokenizer, feature_extractor, safetensors of unet/vae/text_encoder, no safety
    checker), CLIP as CLIPModel + CLIPProcessor files, DINOv2 as Dinov2Model + image processor. They are exactly the
    files `hf download ID --include ...` (persviz.hub_models) fetches, so with HF_HUB_CACHE=cache_dir and
    HF_HUB_OFFLINE=1, `persviz.loading.load_pipeline(SD15)`, `load_evaluator(CLIP_L14, kind='clip')` and
    `load_evaluator(DINO, kind='dino')` (and DINO_DREAMBENCH, CLS-pooled) load them as they would load the real weights. Random weights show nothing
    about the models: this is for testing the full-scale code paths offline.

    Args:
        cache_dir: the cache folder (what HF_HUB_CACHE names; HF_HOME/hub).
        small: True (default) reduced widths (`build_sd15_pipeline(small=True)`, a 2-layer 32-wide CLIP and DINOv2;
            a few seconds, about 40 MB); False the real sizes (about 6 GB of random weights).
        seed: seeds each model's initialisation (the global torch RNG is left as it was).

    Returns:
        {hub id: snapshot folder}.
    """

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    writers = {SD15: _write_sd15_repo, CLIP_L14: _write_clip_repo, DINO: _write_dino_repo,
               DINO_DREAMBENCH: _write_dino_vits16_repo}
    out = {}
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".staging-") as tmp:
        for i, (hub_id, write) in enumerate(writers.items()):
            staged = Path(tmp) / str(i)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                write(staged, small)
            out[hub_id] = file_into_cache(cache_dir, hub_id, staged)
    return out
