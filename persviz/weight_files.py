"""Weight files of other tools (LoRA, Custom Diffusion processors) read by their content, never their suffix.

    sd, container, metadata = read_weights("my_lora.safetensors")   # also a .bin that holds safetensors bytes
    lora_layout(sd)                                                 # 'diffusers', 'kohya', or None

Containers as in ``persviz.embedding_files`` (safetensors by its header, torch zip ``PK``, legacy pickle ``0x80``);
torch files load with ``weights_only=True``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from persviz.errors import PersvizError
from persviz.embedding_files import sniff_container
from persviz.io import PathLike

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class WeightFileError(PersvizError, ValueError):
    """A weights file that cannot be read; the message names the problem and the fix."""


def container_of(path: PathLike) -> str | None:
    """'safetensors', 'torch-zip', 'torch-pickle' from the file's first bytes; None for anything else."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(64)
    return sniff_container(head, p.stat().st_size)


def read_weights(path: PathLike) -> tuple[dict[str, Any], str, dict[str, str]]:
    """(state dict, container, safetensors metadata) of a weights file, told apart by its content."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightFileError(f"no file at {p}; check the path")
    container = container_of(p)
    if container is None:
        raise WeightFileError(f"{p} is neither a safetensors nor a torch file; pass the weights file itself")
    if container == "safetensors":
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, container, dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error classes
            raise WeightFileError(f"{p} looks like safetensors but cannot be read ({err}); copy it again") from None
    try:
        with open(p, "rb") as fh:  # a file object: torch.load would pick its reader by the suffix
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many classes
        raise WeightFileError(f"{p} is a torch file that does not load with weights_only=True "
                              f"({type(err).__name__}); open it in a trusted session and save it as .safetensors") from None
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{p} holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping) and len(obj) <= 3:
        obj = obj["state_dict"]  # some trainers wrap the weights
    return dict(obj), container, {}


def weight_keys(path: PathLike) -> list[str] | None:
    """The keys of a weights file (safetensors: without reading the tensors); None if it is no weights file."""
    p = Path(path)
    try:
        container = container_of(p)
        if container == "safetensors":
            with safe_open(str(p), framework="pt", device="cpu") as f:
                return list(f.keys())
        if container is None:
            return None
        return list(read_weights(p)[0])
    except (OSError, ValueError, RuntimeError):
        return None


def lora_layout(keys: Any) -> str | None:
    """'diffusers' (``unet.*.lora_A.weight`` / ``lora.down`` / ``lora_linear_layer``, ``text_encoder.*`` and SDXL's
    ``text_encoder_2.*``: what diffusers' LoRA scripts and ``save_lora_weights`` write), 'kohya'
    (``lora_unet_*.lora_down.weight``, ``.alpha``, ``lora_te_*`` and SDXL's ``lora_te1_*`` / ``lora_te2_*``: kohya's
    sd-scripts and A1111), 'diffusers-flux' (``transformer.*``: FLUX.1's), 'kohya-flux'
    (``lora_unet_double_blocks_*`` / ``single_blocks_*``: kohya's FLUX.1 LoRA), or None. Which model family a file is
    of is the families' question (``persviz.families.lora_family``)."""
    keys = [str(k) for k in keys]
    if not keys:
        return None
    if all(k.startswith(KOHYA_PREFIXES) for k in keys) and any(".lora_down." in k for k in keys):
        # kohya's FLUX.1 LoRA (flux_train_network.py): BFL's block names, double_blocks_N / single_blocks_N
        return "kohya-flux" if any("_double_blocks_" in k or "_single_blocks_" in k for k in keys) else "kohya"
    lora = ("lora_A.", "lora_B.", "lora.down.", "lora.up.", "lora_linear_layer.")
    if all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys) and any(
            s in k for k in keys for s in lora):
        return "diffusers"
    if all(k.startswith(("transformer.", "text_encoder.")) for k in keys) and any(s in k for k in keys for s in lora):
        return "diffusers-flux"  # FluxPipeline.save_lora_weights (train_dreambooth_lora_flux.py)
    return None


__all__ = ["KOHYA_PREFIXES", "WEIGHT_SUFFIXES", "WeightFileError", "container_of", "lora_layout", "read_weights",
           "weight_keys"]
