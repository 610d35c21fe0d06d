"""FLUX.1 as a persviz family: a rectified-flow transformer (``FluxTransformer2DModel``: 19 double-stream blocks that
attend jointly over text and image tokens, then 38 single-stream blocks) read by two text encoders, ``clip_l`` (CLIP
ViT-L/14, ``tokenizer`` + ``text_encoder``, width 768, whose pooled output is the ``pooled_prompt_embeds``) and ``t5``
(T5 v1.1 XXL's encoder, ``tokenizer_2`` + ``text_encoder_2``, width 4096, whose last hidden state is the
``prompt_embeds``: the transformer's text tokens); bfloat16, 1024 px.

Two Hub models: ``black-forest-labs/FLUX.1-dev`` (the default: guidance-distilled, the guidance is an input of the
transformer, ``guidance_embeds``; 28 steps at guidance 3.5, FluxPipeline's defaults; T5 reads 512 tokens) and
``black-forest-labs/FLUX.1-schnell`` (timestep-distilled: 4 steps, no guidance, 256 T5 tokens, as diffusers'
Flux documentation runs it). Which one a pipeline is, is read from its transformer (``guidance_embeds``), not its
name (``Flux.variant``).

So far persviz loads (a Hub id or a folder; bf16 on a GPU, ``cpu_offload`` for cards under 80 GB), checks and
prepares Flux pipelines, encodes prompts as ``FluxPipeline.encode_prompt`` does (``prompt_states``: prompt-level TEA
and the tracker), applies token-level TEA to learned rows of either encoder, and reads, inspects and fixes Flux
Textual Inversion files (``clip_l`` + ``t5``), and trains DreamBooth-LoRA on the transformer as diffusers'
``train_dreambooth_lora_flux.py`` does (``FLUX_RECIPES``; persviz.trainers.dreambooth_lora_flux). Training Textual
Inversion and Custom Diffusion on Flux is refused with a sentence (``no_recipe``); `persviz adopt dreambooth` takes
diffusers' and kohya's FLUX.1 LoRA files; single-file Flux checkpoints (the transformer alone) are not read.

The architecture values below are the published ones of the two Hub repositories (``model_index.json`` and the
component configs; no machine here reaches the Hub, so they are not checked byte for byte);
``write_test_cache`` writes them at reduced width with random weights, the T5 tokenizer a small SentencePiece-style
Unigram model trained offline on persviz's prompt sets (``t5_test_tokenizer``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.families.base import Family, Pipeline
from persviz.families.sdxl import pooled_at

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
WIDTHS = {"clip_l": 768, "t5": 4096}  # the text widths of Flux's two encoders
SMALL_WIDTHS = {"clip_l": 32, "t5": 48}  # write_test_cache(small=True): different, so a mix-up shows
SMALL_SIDE = 64  # small: default image side in pixels (8 latents of 4 channels, packed 2x2: 16 image tokens)
SHARDS = {"text_encoder_2": 2, "transformer": 3}  # the Hub repositories' weight shards of T5 and the transformer
SMALL_T5_TOKENS = 32  # small: tokenizer_2's model_max_length (the real ones read 512, schnell 256)

MODEL_INDEX = {  # black-forest-labs/FLUX.1-dev (and -schnell) model_index.json
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
SCHEDULERS = {  # scheduler/scheduler_config.json
    FLUX_DEV: {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
               "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
               "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    FLUX_SCHNELL: {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                   "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}}
TRANSFORMER = {  # transformer/config.json (schnell: guidance_embeds false)
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
VAE = {  # vae/config.json: 16 latent channels, no quant convs, scaled and shifted
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True,
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_post_quant_conv": False, "use_quant_conv": False}
T5_XXL = {  # text_encoder_2/config.json (google/t5-v1_1-xxl's encoder)
    "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
    "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
    "vocab_size": 32128}
T5_TOKENS = {FLUX_DEV: 512, FLUX_SCHNELL: 256}  # T5 tokens the pipeline reads (max_sequence_length)

# Generation: FluxPipeline's defaults for dev (num_inference_steps 28, guidance_scale 3.5, max_sequence_length 512);
# diffusers' Flux documentation for schnell (4 steps, guidance_scale 0: the transformer has no guidance input,
# max_sequence_length 256). One image a batch at 1024 px in bf16.
GENERATION = {
    FLUX_DEV: {"steps": 28, "guidance": 3.5, "batch_size": 1, "max_sequence_length": 512},
    FLUX_SCHNELL: {"steps": 4, "guidance": 0.0, "batch_size": 1, "max_sequence_length": 256}}

# Recipes: the defaults of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py, read in huggingface/diffusers
# at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (argparse defaults unless marked): --learning_rate 1e-4,
# --rank 4 (--lora_alpha 4: scale 1, as persviz's LoRA), --resolution 512, --train_batch_size 4,
# --checkpointing_steps 500, --train_text_encoder off, --with_prior_preservation off, --prior_loss_weight 1.0,
# --num_class_images 100, --sample_batch_size 4, --adam_weight_decay 1e-04, --max_grad_norm 1.0, --random_flip off,
# --guidance_scale 3.5 (the transformer's guidance input while training: persviz.trainers.dreambooth_lora_flux),
# --max_sequence_length 512 (T5's tokenizer's own maximum), --weighting_scheme none (uniform timesteps, plain MSE),
# the LoRA on its default target modules (--lora_layers unset); --max_train_steps has no default (one epoch), so steps
# are its README_flux.md example's --max_train_steps=500. Class images (prior preservation, off) would come from the
# pipeline's defaults, 28 steps at guidance 3.5.
FLUX_RECIPES = {
    "dreambooth": {"lr": 1e-4, "rank": 4, "resolution": 512, "batch_size": 4, "save_every": 500, "steps": 500,
                   "train_text_encoder": False, "prior_preservation": False, "prior_loss_weight": 1.0,
                   "num_class_images": 100, "class_batch_size": 4, "class_steps": 28, "class_guidance": 3.5,
                   "weight_decay": 1e-4, "max_grad_norm": 1.0, "flip_p": 0.0},
}
NO_FLUX_RECIPE = {
    "textual_inversion": ("persviz reads, inspects and fixes Flux Textual Inversion files (clip_l + t5) but does "
                          "not train them; diffusers has no Flux Textual Inversion script: train the rows with its "
                          "train_dreambooth_lora_flux_advanced.py (--train_text_encoder_ti) and inspect or fix the "
                          "file with persviz"),
    "custom_diffusion": ("Custom Diffusion fine-tunes a UNet's cross-attention keys and values, which Flux's "
                         "joint-attention transformer does not have"),
    "lora_finetune": "FineXL's LoRA fine-tune is studied on ShapesWorld's micro-SD only"}


@dataclass(frozen=True)
class Flux(Family):
    """FLUX.1 pipelines (diffusers' FluxPipeline) and reduced-width test models of its architecture."""

    def refusal(self, pipe: Pipeline, model: str) -> str | None:
        kind = type(pipe).__name__
        t5 = getattr(getattr(getattr(pipe, "text_encoder_2", None), "config", None), "model_type", "") == "t5"
        if not t5 or getattr(pipe, "tokenizer_2", None) is None:  # its text stack alone (inspect) has no transformer
            return (f"{model} ({kind}) has no T5 text encoder and transformer, so it is not a FLUX.1 pipeline "
                    f"(clip_l + t5 and a joint-attention transformer); use {FLUX_DEV} or {FLUX_SCHNELL}")
        transformer = getattr(pipe, "transformer", None)
        if transformer is not None and not hasattr(transformer, "single_transformer_blocks"):
            return (f"{model} ({kind}) has a transformer of another architecture ({type(pipe.transformer).__name__}), "
                    f"not FLUX.1's FluxTransformer2DModel; use {FLUX_DEV} or {FLUX_SCHNELL}")
        return None

    def variant(self, pipe: Pipeline) -> str:
        """The Hub model a Flux pipeline's settings come from: FLUX.1-dev when its transformer takes a guidance
        input (guidance-distilled), else FLUX.1-schnell."""
        return FLUX_DEV if getattr(pipe.transformer.config, "guidance_embeds", False) else FLUX_SCHNELL

    def pipeline_generation(self, pipe: Pipeline) -> dict[str, Any]:
        """steps, guidance, batch size and T5 length of generation for this pipeline's variant (dev or schnell)."""
        return dict(GENERATION[self.variant(pipe)])

    def text_stack(self, pipe: Pipeline) -> Any:
        from persviz.text_stack import TextEncoder, TextStack  # heavy: torch
        return TextStack((TextEncoder("clip_l", pipe.tokenizer, pipe.text_encoder),
                          TextEncoder("t5", pipe.tokenizer_2, pipe.text_encoder_2, pieces=True)),
                         family=self.label)

    def prompt_states(self, stack: Any, tokens: Any) -> Any:
        """FluxPipeline.encode_prompt's: ([clip_l's last hidden state, T5's last hidden state], clip_l's pooled
        output). The transformer reads T5's state as ``prompt_embeds`` (``state_encoders``: the concatenation the
        protocol describes is T5's alone) and the pooled output as ``pooled_prompt_embeds``; clip_l's hidden state
        is returned so each encoder has its entry, and reaches the transformer only through the pooled output. CLIP
        is read without an attention mask and T5 without one too, as the pipeline does; all in T5's dtype. Where
        tokens[0] holds ``real_ids`` (the prompts' own ids, a placeholder's positions read as another word by
        the caller's hooks), CLIP pools where those ids pool (``pooled_at``: a loaded token, the largest id, is
        where CLIP ViT-L's legacy configuration pools)."""
        import torch  # heavy: torch
        clip, t5 = stack.encoders
        out = clip.encoder(tokens[0]["input_ids"].to(clip.encoder.device), output_hidden_states=False)
        hidden_t5 = t5.encoder(tokens[1]["input_ids"].to(t5.encoder.device), output_hidden_states=False)[0]
        dtype, device = t5.encoder.dtype, hidden_t5.device
        pooled = out.pooler_output
        if "real_ids" in tokens[0]:  # a placeholder's ids read as another word (the tracker's hooks): pooled
            real = tokens[0]["real_ids"].to(out.last_hidden_state.device)  # where the real ids pool, as SDXL's
            last = out.last_hidden_state
            pooled = last[torch.arange(last.shape[0], device=last.device), pooled_at(clip.encoder.config, real)]
        return ([out.last_hidden_state.to(dtype=dtype, device=device), hidden_t5.to(dtype=dtype, device=device)],
                pooled.to(dtype=clip.encoder.dtype, device=device))

    def pooled_encoder(self, stack: Any) -> str | None:
        """clip_l: its pooled output is the transformer's ``pooled_projections``."""
        return stack.encoders[0].name

    def state_encoders(self, stack: Any) -> tuple[str, ...]:
        """The encoders whose hidden states form ``prompt_embeds``: T5 alone (clip_l gives the pooled output)."""
        return ("t5",)

    def prepare(self, pipe: Pipeline, embedded: bool) -> Any:
        """FluxPipeline as its model card runs it: its own flow-matching Euler sampler (kept), VAE slicing (one image
        decoded at a time: the same pixels, a bounded peak)."""
        pipe.vae.enable_slicing()
        return pipe

    def write_test_cache(self, cache_dir: Any, small: bool = True, seed: int = 0) -> dict[str, Any]:
        """FLUX.1-dev's and FLUX.1-schnell's diffusers layouts under their real Hub ids with random weights (each
        drawn from `seed`; schnell's transformer without the guidance embedder); small=True: clip_l 32 wide, T5 48
        (so a mix-up of the encoders shows), a transformer of 2 double-stream and 2 single-stream blocks (2 heads of
        16), a VAE of 4 latent channels, 64 px images, 32 T5 tokens. Weights of T5 and the transformer are written in
        the Hub's shards (2 and 3) with their index (``shard``)."""
        import torch  # heavy: torch
        from persviz.sd15 import file_into_cache  # heavy: torch
        if not small:
            raise ValueError("write_test_cache writes reduced-width Flux models only (small=True); a full-size random "
                             "Flux is 12 B parameters")
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        out = {}
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".staging-") as tmp:
            for hub_id in (FLUX_DEV, FLUX_SCHNELL):
                staged = Path(tmp) / hub_id.split("/")[-1]
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    write_flux_repo(staged, hub_id)
                out[hub_id] = file_into_cache(cache_dir, hub_id, staged)
        return out


def flux_component_configs(hub_id: str = FLUX_DEV, small: bool = True) -> dict[str, dict]:
    """The transformer, VAE and two text-encoder configs of a FLUX.1 model as dicts; small=True narrows every width
    and depth (module constants SMALL_*) and keeps the architecture: block types, 77 CLIP positions, gated-GELU
    T5 with relative attention, 2x2 packing of the latents."""
    from persviz.sd15 import sd15_component_configs  # heavy: diffusers
    transformer = dict(TRANSFORMER, guidance_embeds=hub_id == FLUX_DEV)
    vae, t5 = dict(VAE), dict(T5_XXL)
    clip_l = dict(sd15_component_configs(small)["text_encoder"])  # CLIP ViT-L/14's text tower, as SD 1.5's
    clip_l.pop("_name_or_path", None)
    if small:
        wl, wt = SMALL_WIDTHS["clip_l"], SMALL_WIDTHS["t5"]
        clip_l.update(hidden_size=wl, intermediate_size=4 * wl, num_attention_heads=4, projection_dim=wl)
        t5.update(d_model=wt, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)
        transformer.update(attention_head_dim=16, num_attention_heads=2, num_layers=2, num_single_layers=2,
                           in_channels=16, joint_attention_dim=wt, pooled_projection_dim=wl, axes_dims_rope=[4, 4, 8])
        vae.update(block_out_channels=[8, 16, 16, 16], latent_channels=4, layers_per_block=1, norm_num_groups=8,
                   sample_size=SMALL_SIDE)
    return {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "text_encoder_2": t5}


def t5_training_text() -> list[str]:
    """The sentences the test T5 tokenizer is trained on: persviz's shipped prompt sets with a few class words in
    their slot, so prompt words are mostly whole pieces and rarer words (``teapot``) split in several."""
    from persviz.prompts import prompts_dir  # heavy: numpy (persviz.prompts)
    words = ("dog", "cat", "toy", "man", "woman", "square", "circle", "backpack", "sneaker")
    lines = []
    for path in sorted(prompts_dir().glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                lines += [line.replace("{}", w) for w in words]
    return lines


def t5_test_tokenizer(max_length: int = SMALL_T5_TOKENS) -> Any:
    """A small T5 tokenizer built offline: a Unigram model (SentencePiece's, as T5's ``spiece.model``) of about 800
    pieces trained on ``t5_test_tokenizer``'s sentences, with T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>``
    2), its "▁" word-start marker and ``</s>`` appended; wrapped as transformers' T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # heavy: tokenizers
    from transformers import T5TokenizerFast  # heavy: transformers
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=800, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(t5_training_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=max_length)


def write_flux_repo(folder: Path, hub_id: str = FLUX_DEV) -> None:
    """A FLUX.1 model's diffusers layout with random reduced-width weights: model_index.json, scheduler, the CLIP
    tokenizer (SD 1.5's BPE, as FLUX.1's), the test T5 tokenizer, transformer and text_encoder_2 in shards with their
    index, vae, text_encoder."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel  # heavy: diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # heavy: transformers
    from persviz.sd15 import sd15_config_dir  # heavy: torch
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS[hub_id], indent=2) + "\n")
    shutil.copytree(sd15_config_dir() / "tokenizer", folder / "tokenizer")
    tokenizer_2 = t5_test_tokenizer()
    tokenizer_2.save_pretrained(folder / "tokenizer_2")
    configs = flux_component_configs(hub_id, small=True)
    configs["text_encoder_2"]["vocab_size"] = len(tokenizer_2)
    CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).save_pretrained(folder / "text_encoder")
    T5EncoderModel(T5Config.from_dict(configs["text_encoder_2"])).save_pretrained(folder / "text_encoder_2")
    shard(folder / "text_encoder_2", "model", SHARDS["text_encoder_2"])
    FluxTransformer2DModel.from_config(configs["transformer"]).save_pretrained(folder / "transformer")
    shard(folder / "transformer", "diffusion_pytorch_model", SHARDS["transformer"])
    AutoencoderKL.from_config(configs["vae"]).save_pretrained(folder / "vae")


def shard(folder: Path, stem: str, n: int) -> None:
    """folder/<stem>.safetensors split into n files named as the Hub's shards (<stem>-00001-of-0000n.safetensors)
    with their index (<stem>.safetensors.index.json: total size, weight map), as transformers and diffusers write
    them; the unsharded file removed."""
    from safetensors.torch import load_file, save_file  # heavy: torch
    whole = folder / f"{stem}.safetensors"
    tensors = load_file(str(whole))
    keys = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::n]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    whole.unlink()


FAMILY = Flux(
    "flux", "FLUX.1", hub_ids=(FLUX_DEV, FLUX_SCHNELL),
    generation=GENERATION[FLUX_DEV],  # the default model's; a pipeline's own: Flux.pipeline_generation
    # DreamBooth-LoRA on the transformer (train_dreambooth_lora_flux.py's defaults; its runs and kohya's FLUX.1 LoRAs
    # adopted); Textual Inversion and Custom Diffusion have no recipe (their sentences)
    recipes=FLUX_RECIPES, no_recipe=NO_FLUX_RECIPE, pipeline_class="FluxPipeline",
    # the transformer's blocks: diffusers' transformer.transformer_blocks / single_transformer_blocks, kohya's (BFL's
    # names) double_blocks / single_blocks; no UNet's LoRA holds them
    lora_marks=("transformer.transformer.blocks.", "single.transformer.blocks.", "double.blocks.", "single.blocks."),
    gpu_dtype="bfloat16")
