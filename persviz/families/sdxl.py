"""Stable Diffusion XL as a persviz family: two CLIP text encoders, ``clip_l`` (CLIP ViT-L/14, ``tokenizer`` +
``text_encoder``, width 768) and ``clip_g`` (OpenCLIP ViT-bigG/14, ``tokenizer_2`` + ``text_encoder_2``, width 1280,
the pooled one), whose penultimate hidden states are concatenated (2048) for the UNet; 1024 px.

So far persviz loads (a Hub id, a folder or a single-file checkpoint), checks and prepares SDXL pipelines, inspects
SDXL embedding files per encoder and trains Textual Inversion on SDXL, a row per encoder (``unet_condition``: the
conditioning diffusers' ``textual_inversion_sdxl.py`` builds), and DreamBooth-LoRA on the UNet with the text encoders
off (``train_dreambooth_lora_sdxl.py``'s default; the same ``unet_condition``, time ids included) or on (LoRA on
both text encoders' attention, that script's ``--train_text_encoder``); it encodes prompts
as the pipeline does for prompt-level TEA and the tracker (``prompt_states``). ``persviz adopt`` takes SDXL LoRA
files of diffusers and kohya (``adopts_only``; an SD 1.x LoRA is told apart by ``lora_marks``); adopting other
methods' SDXL runs is refused with a sentence, Custom Diffusion too (no recipe).

The architecture values below are those of the Hub repository ``stabilityai/stable-diffusion-xl-base-1.0`` (its
``model_index.json`` and component ``config.json`` files; no machine here reaches the Hub: ``model_index.json`` and
``unet/config.json`` were checked value by value against public copies of them, the scheduler, ``text_encoder_2`` and
VAE values are the published ones but not checked byte for byte as data/sd15/ is); ``write_test_cache`` writes them
at reduced width with random weights.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.families.base import Family, Pipeline

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
WIDTHS = {"clip_l": 768, "clip_g": 1280}  # the text widths of SDXL's two encoders
SMALL_WIDTHS = {"clip_l": 32, "clip_g": 48}  # write_test_cache(small=True): different, so a mix-up shows
SMALL_UNET_CHANNELS = (32, 64, 64)  # small: UNet block widths (SDXL: 320-640-1280)
SMALL_HEADS = (2, 4, 4)  # small: attention heads per block, 16 wide each (SDXL: 5-10-20 heads of 64)
SMALL_TIME_DIM = 8  # small: addition_time_embed_dim (SDXL: 256)
SMALL_SIDE = 64  # small: default image side in pixels (8 latents)

MODEL_INDEX = {  # stabilityai/stable-diffusion-xl-base-1.0 model_index.json
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
SCHEDULER = {  # scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False}
UNET = {  # unet/config.json
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True}
VAE_CHANGES = {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}  # vae/config.json vs SD 1.5's
CLIP_G = {  # text_encoder_2/config.json (OpenCLIP ViT-bigG/14's text tower)
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
    "projection_dim": 1280, "vocab_size": 49408}
TOKENIZER_2_PAD = "!"  # tokenizer_2 pads with '!' (id 0, as OpenCLIP), tokenizer with <|endoftext|>

# Recipes: the TEA paper gives none for SDXL, so these are the defaults of diffusers' SDXL example scripts, read in
# huggingface/diffusers at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (argparse defaults unless marked).
#   examples/textual_inversion/textual_inversion_sdxl.py: --learning_rate 1e-4, --scale_lr off (False),
#     --max_train_steps 5000, --train_batch_size 16, --gradient_accumulation_steps 1, --resolution 512,
#     --save_steps 500, --num_vectors 1, --adam_weight_decay 1e-2, --lr_scheduler constant (its
#     --lr_warmup_steps 500 is not used by 'constant'), --center_crop off; TextualInversionDataset(flip_p=0.5) with
#     imagenet_templates_small (persviz's OBJECT_TEMPLATES, the config's default). (Its README_sdxl.md example
#     command differs: --resolution 768, batch 1 x accumulation 4, 500 steps, --learning_rate 5e-4 with --scale_lr.)
#   examples/dreambooth/train_dreambooth_lora_sdxl.py: --learning_rate 1e-4, --rank 4, --resolution 1024,
#     --train_batch_size 4, --checkpointing_steps 500, --train_text_encoder off (on: --text_encoder_lr 5e-6 and
#     --adam_weight_decay_text_encoder 1e-03 for both text encoders' adapters, a parameter group of their own),
#     --with_prior_preservation off, --prior_loss_weight 1.0, --num_class_images 100, --sample_batch_size 4, --adam_weight_decay 1e-04,
#     --max_grad_norm 1.0, --random_flip off, --scale_lr off; --max_train_steps has no default (one epoch,
#     --num_train_epochs 1), so steps are its README_sdxl.md example's --max_train_steps=500 (batch 1 x accumulation
#     4 there: 4 images a step, as the default batch 4); class images come from pipeline(prompt), the SDXL pipeline's
#     defaults 50 steps at guidance 5.0.
# diffusers has no SDXL version of examples/custom_diffusion/train_custom_diffusion.py.
SDXL_RECIPES = {
    "textual_inversion": {"lr": 1e-4, "steps": 5000, "batch_size": 16, "resolution": 512, "save_every": 500,
                          "num_vectors": 1, "weight_decay": 1e-2, "flip_p": 0.5},
    "dreambooth": {"lr": 1e-4, "rank": 4, "resolution": 1024, "batch_size": 4, "save_every": 500, "steps": 500,
                   "train_text_encoder": False, "prior_preservation": False, "prior_loss_weight": 1.0,
                   "num_class_images": 100, "class_batch_size": 4, "class_steps": 50, "class_guidance": 5.0,
                   "weight_decay": 1e-4, "max_grad_norm": 1.0, "flip_p": 0.0,
                   "text_encoder_lr": 5e-6, "text_weight_decay": 1e-3},
}
NO_SDXL_RECIPE = {"custom_diffusion": "diffusers' Custom Diffusion example, train_custom_diffusion.py, has no SDXL version",
                  "lora_finetune": "FineXL's LoRA fine-tune is studied on ShapesWorld's micro-SD only"}


@dataclass(frozen=True)
class StableDiffusionXL(Family):
    """SDXL pipelines (diffusers' StableDiffusionXLPipeline) and reduced-width test models of its architecture."""

    def refusal(self, pipe: Pipeline, model: str) -> str | None:
        kind = type(pipe).__name__
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
            return (f"{model} ({kind}) has no second text encoder and tokenizer, so it is not an SDXL pipeline "
                    f"(clip_l + clip_g); use {SDXL_BASE} or a model fine-tuned from it")
        t5 = getattr(getattr(pipe.text_encoder_2, "config", None), "model_type", "") == "t5"
        if getattr(pipe, "transformer", None) is not None or t5:  # FLUX.1 (clip_l + t5, a transformer): Flux's
            return (f"{model} ({kind}) has a T5 text encoder and a transformer, not clip_g and a UNet, so it is not "
                    f"an SDXL pipeline; use {SDXL_BASE} or a model fine-tuned from it")
        return None

    def text_stack(self, pipe: Pipeline) -> Any:
        from persviz.text_stack import TextEncoder, TextStack  # heavy: torch
        return TextStack((TextEncoder("clip_l", pipe.tokenizer, pipe.text_encoder),
                          TextEncoder("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)))

    def unet_condition(self, stack: Any, ids: Any, real_ids: Any, size: tuple[int, int], resolution: int) -> Any:
        """As diffusers' textual_inversion_sdxl.py and StableDiffusionXLPipeline.encode_prompt: each encoder's
        penultimate hidden states, concatenated (768 + 1280); clip_g's projected pooled output (``text_embeds``)
        and the time ids (original size, crop top-left (0, 0): persviz's centre crop is taken before resizing,
        target size). The pooled output is read where the model reads it for the prompt's real ids (``pooled_at``):
        with SDXL's clip_g config (eos_token_id 2) that is the largest id, the placeholder's once it is loaded, so the
        row trains for the position the pipeline will read."""
        import torch  # heavy: torch
        hidden, out = [], None
        for e, i in zip(stack, ids):
            out = e.encoder(i, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled_by = stack.encoders[-1].encoder
        last = out.last_hidden_state
        at = pooled_at(pooled_by.config, real_ids[-1])
        pooled = pooled_by.text_projection(last[torch.arange(last.shape[0], device=last.device), at])
        time_ids = torch.tensor([*size, 0, 0, resolution, resolution], dtype=pooled.dtype, device=pooled.device)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.repeat(last.shape[0], 1)}

    def pooled_encoder(self, stack: Any) -> str | None:
        """clip_g: its projected pooled output is the UNet's ``text_embeds``."""
        return stack.encoders[-1].name

    def prompt_states(self, stack: Any, tokens: Any) -> Any:
        """StableDiffusionXLPipeline.encode_prompt's: each encoder's penultimate hidden states (clip_l 768, clip_g
        1280 wide; concatenated they are ``prompt_embeds``, 2048) and clip_g's projected pooled output
        (``pooled_prompt_embeds``), all in clip_g's dtype as the pipeline casts them. A token dict may hold
        ``real_ids`` beside ``input_ids`` (a caller that feeds stand-in ids at a placeholder and writes its row with a
        hook, as the tracker): the pooled output is then read where the pipeline reads it for the real ids
        (``pooled_at``: the placeholder's position once it is loaded), not where the stand-ins put it."""
        import torch  # heavy: torch
        hidden, out = [], None
        dtype = stack.encoders[-1].encoder.dtype
        for e, t in zip(stack, tokens):
            out = e.encoder(t["input_ids"].to(e.encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        device = hidden[-1].device
        pooled = out[0]
        real = tokens[-1].get("real_ids") if isinstance(tokens[-1], dict) else None
        if real is not None:
            by = stack.encoders[-1].encoder
            last = out.last_hidden_state
            at = pooled_at(by.config, real.to(last.device))
            pooled = by.text_projection(last[torch.arange(last.shape[0], device=last.device), at])
        return [h.to(dtype=dtype, device=device) for h in hidden], pooled.to(dtype=dtype, device=device)

    def prepare(self, pipe: Pipeline, embedded: bool) -> Any:
        """The sampler of diffusers' SDXL examples (textual_inversion_sdxl.py's validation: DPM-Solver++ from the
        pipeline's scheduler config) and VAE slicing: a batch is decoded one image at a time, the same pixels with
        a bounded peak; no tiling, which blends 512 px tiles and so changes the pixels of a 1024 px image."""
        from diffusers import DPMSolverMultistepScheduler  # heavy: diffusers
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
        pipe.vae.enable_slicing()
        return pipe

    def write_test_cache(self, cache_dir: Any, small: bool = True, seed: int = 0) -> dict[str, Any]:
        """SDXL base's diffusers layout under its real Hub id with random weights; small=True: clip_l 32 wide,
        clip_g 48 (so a mix-up of the encoders shows), UNet 32-64-64 (cross-attention 80), 64 px images."""
        import torch  # heavy: torch
        from persviz.sd15 import file_into_cache  # heavy: torch
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".staging-") as tmp:
            staged = Path(tmp) / "sdxl"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                write_sdxl_repo(staged, small)
            return {SDXL_BASE: file_into_cache(cache_dir, SDXL_BASE, staged)}


def pooled_at(config: Any, input_ids: Any) -> Any:
    """The position a CLIP text model pools for each prompt [B] (transformers' CLIPTextTransformer): the largest id
    where the config's eos_token_id is the legacy 2 (SDXL base's encoders), else the first eos_token_id."""
    if config.eos_token_id == 2:
        return input_ids.argmax(dim=-1)
    return (input_ids == config.eos_token_id).int().argmax(dim=-1)


def sdxl_component_configs(small: bool = False) -> dict[str, dict]:
    """SDXL base's UNet, VAE and two text-encoder configs as dicts; small=True narrows every width (module
    constants SMALL_*) and keeps the architecture: block types, depths, the 49408-token vocabulary, 77 positions."""
    from persviz.sd15 import sd15_component_configs  # heavy: diffusers
    sd15 = sd15_component_configs(small)
    unet, vae = dict(UNET), dict(sd15["vae"]) | VAE_CHANGES
    clip_l, clip_g = dict(sd15["text_encoder"]), dict(CLIP_G)
    clip_l.pop("_name_or_path", None)
    if small:
        wl, wg = SMALL_WIDTHS["clip_l"], SMALL_WIDTHS["clip_g"]
        clip_l.update(hidden_size=wl, intermediate_size=4 * wl, num_attention_heads=4, projection_dim=wl)
        clip_g.update(hidden_size=wg, intermediate_size=4 * wg, num_attention_heads=4, projection_dim=wg)
        unet.update(block_out_channels=list(SMALL_UNET_CHANNELS), attention_head_dim=list(SMALL_HEADS),
                    cross_attention_dim=wl + wg, addition_time_embed_dim=SMALL_TIME_DIM,
                    projection_class_embeddings_input_dim=6 * SMALL_TIME_DIM + wg, sample_size=SMALL_SIDE // 8)
        vae.update(sample_size=SMALL_SIDE)
    return {"unet": unet, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g}


def write_sdxl_repo(folder: Path, small: bool) -> None:
    """SDXL base's diffusers layout with random weights: model_index.json, scheduler, the two tokenizers (CLIP's
    BPE as persviz builds it for SD 1.5; tokenizer_2 pads with '!'), unet, vae, text_encoder, text_encoder_2."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy: diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # heavy: transformers
    from persviz.sd15 import sd15_config_dir  # heavy: torch
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    for sub, pad in (("tokenizer", None), ("tokenizer_2", TOKENIZER_2_PAD)):
        shutil.copytree(sd15_config_dir() / "tokenizer", folder / sub)
        if pad is not None:
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                data = json.loads((folder / sub / name).read_text())
                data["pad_token"] = pad
                (folder / sub / name).write_text(json.dumps(data, indent=2) + "\n")
    configs = sdxl_component_configs(small)
    UNet2DConditionModel.from_config(configs["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(configs["vae"]).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])).save_pretrained(
        folder / "text_encoder_2")


FAMILY = StableDiffusionXL(
    "sdxl", "Stable Diffusion XL", hub_ids=(SDXL_BASE,),
    # textual_inversion_sdxl.py's validation: 25 steps at the pipeline's default guidance 5.0 and 1024 px
    generation={"steps": 25, "guidance": 5.0, "batch_size": 4},
    # Textual Inversion learns a row per encoder; DreamBooth-LoRA trains the UNet's LoRA (text encoders off, as
    # train_dreambooth_lora_sdxl.py's default; on: both encoders' attention LoRAs too)
    trains_only=("textual_inversion", "dreambooth"), recipes=SDXL_RECIPES, no_recipe=NO_SDXL_RECIPE,
    # adopting: LoRA files of diffusers (save_lora_weights: unet., text_encoder., text_encoder_2.) and kohya
    # (lora_unet_, lora_te1_, lora_te2_); other tools' SDXL Textual Inversion runs are read by inspect / fix so far
    adopts_only=("dreambooth",),
    # LoRA files only SDXL's hold: its second text encoder (diffusers' text_encoder_2., kohya's lora_te1_/lora_te2_)
    # and its UNet's second transformer block (transformer_layers_per_block [1, 2, 10]; SD 1.x's are 1)
    lora_marks=("text.encoder.2.", "lora.te1.", "lora.te2.", "attentions.0.transformer.blocks.1."),
    # single-file checkpoints: clip_g (OpenCLIP bigG) under conditioner.embedders.1. (the refiner has only .0.)
    checkpoint_prefix="conditioner.embedders.1.", pipeline_class="StableDiffusionXLPipeline")
