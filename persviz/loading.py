"""One loader for pipelines and one for evaluators: ShapesWorld by default, Hub ids or local folders at full scale.

Nothing here downloads unless you pass a Hub id and the Hub is reachable; offline and
missing, the error says which model and how to get it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from persviz.errors import PersvizError
from persviz import evaluators
from persviz.constants import SCALE_ENV, SHAPESWORLD
from persviz.hub_models import CLIP_L14, DINO, DINO_DREAMBENCH, SD15, download_hint
from persviz.paths import DataNotFoundError, shapesworld_dir

OPEN_CLIP_L14 = "open_clip:ViT-L-14/openai"
FULL_DEFAULTS = {"pipeline": SD15, "clip": CLIP_L14, "dino": DINO}


class ModelNotAvailableError(OSError, PersvizError):
    """A model could not be loaded from a local folder, the local cache or the Hub."""


def full_scale() -> bool:
    """True when the environment variable PERSVIZ_SCALE=full asks for real models (default: ShapesWorld)."""
    value = os.environ.get(SCALE_ENV, SHAPESWORLD).strip().lower()
    if value not in (SHAPESWORLD, "full"):
        raise ValueError(f"{SCALE_ENV}={value!r} is not understood; use '{SHAPESWORLD}' (default) or 'full'")
    return value == "full"


def default_model(kind: str) -> str:
    """The model the notebooks' setup and the command line's defaults use for `kind` ('pipeline', 'clip', 'dino') at
    the scale PERSVIZ_SCALE asks for; library functions take their models as arguments instead."""
    return FULL_DEFAULTS[kind] if full_scale() else SHAPESWORLD


def pick_device(device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> tuple[torch.device, torch.dtype]:
    """The given device/dtype, else CUDA with float16 when present, else Apple's MPS (float32), else CPU (float32)."""
    if device is None:
        mps = getattr(torch.backends, "mps", None)
        device = ("cuda" if torch.cuda.is_available() else
                  "mps" if mps is not None and mps.is_available() else "cpu")
    dev = torch.device(device)
    return dev, dtype or (torch.float16 if dev.type == "cuda" else torch.float32)


def unavailable_error(name: str, err: Exception) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    local = Path(str(name)).expanduser()
    if local.exists():
        return ModelNotAvailableError(f"'{name}' exists but is not a loadable model folder: {err}")
    why = ("downloads are off (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub could not be reached")
    how = (f"`open_clip.create_model_and_transforms('{name[10:].split('/')[0]}', pretrained='{name.split('/')[-1]}')`"
           if name.startswith("open_clip:") else download_hint(name))
    return ModelNotAvailableError(
        f"Model '{name}' is not in the local Hugging Face cache and {why}. Download it once where there is "
        f"internet ({how}), or pass the path of a local folder that holds it; or use '{SHAPESWORLD}', "
        f"the embedded default that ships with persviz.")


def is_embedded(model: object) -> bool:
    """Whether `model` names the embedded ShapesWorld micro-SD ('shapesworld' or None), not a full-scale model."""
    return model is None or str(model) == SHAPESWORLD


def _resolve(model: Union[str, Path], sub: str) -> Union[str, Path]:
    return shapesworld_dir() / sub if str(model) == SHAPESWORLD else model


def load_pipeline(model: Union[str, Path, object, None] = None, device: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None):
    """The pipeline of a model as its model_index.json names it (SD 1.x's StableDiffusionPipeline without the safety
    checker, SDXL's StableDiffusionXLPipeline; persviz.families checks and prepares it): 'shapesworld' (default,
    whatever PERSVIZ_SCALE says: the notebooks' setup and the command line choose by scale), a Hub id such as SD 1.5
    or SDXL base, a local folder, or a loaded pipeline."""
    from diffusers import DiffusionPipeline  # heavy: diffusers
    dev, dt = pick_device(device, dtype)
    if isinstance(model, DiffusionPipeline):
        return model.to(dev) if device else model
    name = model if model is not None else SHAPESWORLD  # never PERSVIZ_SCALE: callers name the model they want
    if Path(str(name)).expanduser().is_file():
        raise ModelNotAvailableError(f"{name} is a file, not a model folder or Hub id: single-file checkpoints are "
                                     "loaded by persviz.families.assemble_pipeline (which finds their family), as "
                                     "--model on the command line does")
    where = _resolve(name, "sd")  # DataNotFoundError (not wrapped below) when the ShapesWorld data is missing
    try:
        index = DiffusionPipeline.load_config(where)  # model_index.json: from the folder or the cache
        no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        pipe = DiffusionPipeline.from_pretrained(where, dtype=dt, **no_checker)
    except (OSError, ValueError) as err:
        raise unavailable_error(str(name), err) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def load_evaluator(model: Union[str, Path, None] = None, kind: str = "clip", device: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None, pooling: Optional[str] = None):
    """A CLIP-like (kind='clip'), DINO-like (kind='dino') evaluator or the ShapesWorld oracle (kind='oracle').

    model: 'shapesworld' (default), a transformers Hub id or folder (CLIP ViT-L/14, DINOv2, DINO ViT-S/16), or
    'open_clip:ARCH/PRETRAINED' for open_clip (e.g. 'open_clip:ViT-L-14/openai').
    pooling (DINO only): 'mean' of the last hidden states (the TEA code's DINOv2-base) or 'cls' (DreamBench's DINO
    ViT-S/16); default 'cls' for DINO_DREAMBENCH, else 'mean'."""
    if kind not in ("clip", "dino", "oracle"):
        raise ValueError(f"kind must be 'clip', 'dino' or 'oracle', got {kind!r}")
    if pooling is not None and kind != "dino":
        raise ValueError(f"pooling is a DINO option; kind={kind!r} takes none")
    dev, dt = pick_device(device, dtype)
    name = model if model is not None else SHAPESWORLD  # never PERSVIZ_SCALE: callers name the model they want
    try:
        if kind == "oracle":
            if str(name) != SHAPESWORLD:
                raise ValueError("the attribute oracle exists for ShapesWorld only; use model='shapesworld'")
            from persviz.shapesworld.oracle import AttributeOracle  # heavy: the oracle module imports diffusers
            return AttributeOracle.from_pretrained(shapesworld_dir() / "oracle").to(dev).eval()
        if kind == "clip" and str(name).startswith("open_clip:"):
            return evaluators.OpenClipEvaluator.load(str(name)[len("open_clip:"):], dev, dt)
        if kind == "clip":
            return evaluators.HFClipEvaluator.load(_resolve(name, "clip"), dev, dt)
        if pooling is None:
            pooling = "cls" if str(name) == DINO_DREAMBENCH else "mean"
        return evaluators.HFDinoEvaluator.load(_resolve(name, "dino"), dev, dt, pooling=pooling)
    except (OSError, RuntimeError) as err:
        if isinstance(err, (ModelNotAvailableError, DataNotFoundError)):
            raise
        raise unavailable_error(str(name), err) from None


def describe(pipe) -> dict:
    """{component: (class name, parameters)} of a pipeline, for a quick look at what was loaded."""
    out = {}
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        n = sum(p.numel() for p in comp.parameters()) if hasattr(comp, "parameters") else 0
        out[name] = (type(comp).__name__, n)
    return out
