"""Single-file checkpoints (the original Stable Diffusion / SGM layout A1111, ComfyUI and Forge load) written from a
diffusers model folder, for the tests of ``--model path.safetensors``.

Written here (not copied) to follow diffusers' own converters key for key, huggingface/diffusers at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951:

- ``scripts/convert_diffusers_to_original_stable_diffusion.py`` (SD 1.x): ``convert_unet_state_dict`` (4 down
  blocks, attention in the first 3), ``convert_vae_state_dict`` (the mid-attention's q/k/v/proj_out reshaped to 1x1
  convolutions), the text encoder kept as it is under ``cond_stage_model.transformer.``; UNet under
  ``model.diffusion_model.``, VAE under ``first_stage_model.``.
- ``scripts/convert_diffusers_to_original_sdxl.py`` (SDXL): the same UNet map for 3 down blocks (attention in the
  last 2, ``label_emb`` for the added time embedding, ``output_blocks.2.2.conv``), the VAE map with SDXL's attention
  names (to_q/to_k/to_v/to_out.0), clip_l kept as it is under ``conditioner.embedders.0.transformer.`` and clip_g in
  OpenCLIP's layout under ``conditioner.embedders.1.model.`` (q/k/v fused into ``in_proj_weight``/``in_proj_bias``,
  ``text_projection`` transposed).

Both maps match by name prefixes, so they hold for the reduced-width test models, which keep the real block
structure (SD 1.5: 4 UNet blocks; SDXL: 3; both VAEs 4 blocks of 2 resnets).
"""
from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import torch


def _unet_maps(sdxl: bool) -> tuple[list, list, list]:
    base = [("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("time_embed.0.bias", "time_embedding.linear_1.bias"),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
            ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
            ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias")]
    if sdxl:
        base += [("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
                 ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
                 ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
                 ("label_emb.0.2.bias", "add_embedding.linear_2.bias")]
    resnet = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
              ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    layer = []
    blocks = 3 if sdxl else 4
    for i in range(blocks):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if (i > 0) if sdxl else (i < 3):
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(4 if sdxl else 3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if (i < 2) if sdxl else (i > 0):
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if sdxl or i < 3:
            layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    if sdxl:
        layer.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return base, resnet, layer


def convert_unet(sd: dict, sdxl: bool) -> dict:
    base, resnet, layer = _unet_maps(sdxl)
    mapping = {k: k for k in sd}
    for sd_name, hf_name in base:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in resnet:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in layer:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {sd_name: sd[hf_name] for hf_name, sd_name in mapping.items()}


def convert_vae(sd: dict, sdxl: bool) -> dict:
    conv = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            conv.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            conv.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            conv.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            conv.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        conv.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    if not sdxl:  # the SD script's list names the older attention layout too; the same result on diffusers' current one
        attn += [("q.", "query."), ("k.", "key."), ("v.", "value."), ("proj_out.", "proj_attn.")]
    mapping = {k: k for k in sd}
    for k, v in mapping.items():
        for sd_part, hf_part in conv:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in attn:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    out = {v: sd[k] for k, v in mapping.items()}
    for k, v in out.items():
        if any(f"mid.attn_1.{w}.weight" in k for w in ("q", "k", "v", "proj_out")) and v.ndim != 1:
            out[k] = v.reshape(*v.shape, 1, 1)
    return out


_OPENCLIP = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
             (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
             ("ln_final.", "text_model.final_layer_norm."),
             ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
_PROTECTED = {re.escape(hf): sd for sd, hf in _OPENCLIP}
_PATTERN = re.compile("|".join(_PROTECTED))


def convert_openclip(sd: dict) -> dict:
    """clip_g (CLIPTextModelWithProjection) in OpenCLIP's layout, as convert_openclip_text_enc_state_dict."""
    out, qkv_w, qkv_b = {}, {}, {}
    for k, v in sd.items():
        for suffix, store in ((".weight", qkv_w), (".bias", qkv_b)):
            if any(k.endswith(f".self_attn.{c}_proj{suffix}") for c in "qkv"):
                pre = k[: -len(f".q_proj{suffix}")]
                store.setdefault(pre, [None, None, None])["qkv".index(k[-len(f"q_proj{suffix}")])] = v
                break
        else:
            out[_PATTERN.sub(lambda m: _PROTECTED[re.escape(m.group(0))], k)] = v
    for store, suffix in ((qkv_w, ".in_proj_weight"), (qkv_b, ".in_proj_bias")):
        for pre, parts in store.items():
            out[_PATTERN.sub(lambda m: _PROTECTED[re.escape(m.group(0))], pre) + suffix] = torch.cat(parts)
    return out


def clip_keys(sd: dict) -> dict:
    """CLIPTextModel's keys as the Hub's files and single-file checkpoints hold them: under ``text_model.``
    (transformers 5.6 and later save the flattened model without it; the converters expect it)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def write_single_file(model_dir: Path, out: Path, sdxl: bool, half: bool = False) -> Path:
    """The diffusers folder `model_dir` (SD 1.x or SDXL) as one .safetensors checkpoint at `out`."""
    load = lambda sub, name="diffusion_pytorch_model.safetensors": safetensors.torch.load_file(  # noqa: E731
        str(Path(model_dir) / sub / name))
    sd = {"model.diffusion_model." + k: v for k, v in convert_unet(load("unet"), sdxl).items()}
    sd |= {"first_stage_model." + k: v for k, v in convert_vae(load("vae"), sdxl).items()}
    if sdxl:
        sd |= {"conditioner.embedders.0.transformer." + k: v
               for k, v in clip_keys(load("text_encoder", "model.safetensors")).items()}
        g = {"conditioner.embedders.1.model." + k: v for k, v in convert_openclip(
            load("text_encoder_2", "model.safetensors")).items()}
        g["conditioner.embedders.1.model.text_projection"] = g.pop(
            "conditioner.embedders.1.model.text_projection.weight").T.contiguous()
        sd |= g
    else:
        sd |= {"cond_stage_model.transformer." + k: v
               for k, v in clip_keys(load("text_encoder", "model.safetensors")).items()}
    if half:
        sd = {k: v.half() for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out
