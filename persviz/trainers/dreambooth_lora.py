"""DreamBooth with LoRA (Ruiz et al. 2023, Hu et al. 2022) for any StableDiffusionPipeline: resumable, bit-reproducible.

Follows diffusers' ``examples/dreambooth/train_dreambooth_lora.py``: peft LoRA adapters (``LoraConfig(r=rank,
lora_alpha=rank, init_lora_weights="gaussian")``) on the UNet's attention projections (to_q, to_k, to_v, to_out.0)
and, with ``train_text_encoder``, on the text encoder's (q_proj, k_proj, v_proj, out_proj); the adapters train in
float32 also in a float16 pipeline (the example's ``cast_training_params``), with a GradScaler for float16 gradients;
an identifier in the instance prompt ("a photo of sks square"); noise-prediction MSE on the VAE latents (times
``vae.config.scaling_factor``) noised with the pipeline's scheduler config read as a DDPMScheduler; AdamW (betas
0.9/0.999, eps 1e-8, weight decay 1e-2, constant lr), gradients clipped to norm 1.0. Prior preservation as in the
example: ``num_class_images`` images of the class prompt ("a photo of a square") generated once by the base
pipeline, each instance batch concatenated with as many class images (class prompt) in one forward pass, and
``loss = mse(instance) + prior_loss_weight * mse(class)``. TEA (docs/tea.md §8) trained DreamBooth-LoRA with rank
4, lr 1e-4, the text encoder on and prior weight 1.0: the defaults here. Where TEA says nothing the defaults are
ours: steps 800, batch 1 (the example's default is 4), a snapshot every 100 steps.

On SDXL (diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py``): the UNet's adapters alone (that script's
default, ``train_text_encoder=False``) or, with ``train_text_encoder`` (its ``--train_text_encoder``), adapters on
both text encoders' attention projections too (q/k/v/out_proj of clip_l and clip_g, the same rank and
initialisation), trained at ``text_encoder_lr`` with ``text_weight_decay`` (its ``--text_encoder_lr`` 5e-6 and
``--adam_weight_decay_text_encoder`` 1e-3: a parameter group of their own; None, as SD 1.x's recipe, trains them
with the UNet's lr and weight decay), every adapter clipped together; the UNet reads what the family gives
(``Family.unet_condition``: both encoders' penultimate states, clip_g's pooled output, the time ids original size
(the side of the centre crop before resizing) + crop (0, 0) + target size, as that script's ``compute_time_ids``),
re-encoded at every step while the text encoders train; the LoRA saved by
``StableDiffusionXLPipeline.save_lora_weights`` (``unet_lora_layers``, ``text_encoder_lora_layers``,
``text_encoder_2_lora_layers``); the recipe is the family's (``persviz.families.sdxl``).

Differences in mechanics, none in the objective:
- images are centre-cropped and resized with bicubic filtering once (the example resizes bilinearly and crops
  at random, which is the same for square images), and a horizontal flip (``flip_p``, off by default as the example
  has none) applies to instance and class images alike;
- the batch of step s (images with replacement, latent sample, noise, timesteps) comes from ``step_rng(seed, s)``
  and the LoRA initialisation (A ~ N(0, 1/rank^2), B = 0, peft's "gaussian") from a stream of its own, so no global
  random state is read or set, and a resumed run equals an uninterrupted one bit for bit on the CPU (on CUDA too
  with ``torch.use_deterministic_algorithms(True)``, left to the caller);
- the modules stay in eval mode (SD has no dropout in training mode either, so the numbers are the same).

The adapters are added to the pipeline's own unet and text encoder during training (a callback may sample from
``pipe`` to watch progress) and removed on exit, also after an exception or a KeyboardInterrupt: the base weights are
never changed and the modules, flags and modes are as before. A pipeline that already holds LoRA layers is refused.
At the end the final weights are loaded with ``pipe.load_lora_weights`` (``load_result=False`` leaves pipe as it was).

Files in ``out_dir``: ``config.json`` (the config and a fingerprint of the images and the pipeline, compared on
resume), ``checkpoint-{k}/pytorch_lora_weights.safetensors`` every ``save_every`` steps and
``pytorch_lora_weights.safetensors`` at the end (diffusers format: ``StableDiffusionPipeline.save_lora_weights`` of
``convert_state_dict_to_diffusers(get_peft_model_state_dict(...))`` as the example; read by
``pipe.load_lora_weights(path)``), ``class_images/`` (the prior-preservation images, PNG, with a manifest) and
``resume_state.pt`` (adapter weights, optimiser, scaler, losses, step).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from persviz.families.base import Pipeline
from persviz.families import family_of, lora_refusal, text_stack
from persviz.embeddings import single_token_id
from persviz.io import PathLike, atomic_folder, atomic_write
from persviz.seeding import step_rng
from persviz.trainers.core import (
    CHECKPOINT,
    CLASS_DIR,
    INIT_STREAM,
    RESUME_FILE,
    Noising,
    TrainResult,
    adamw,
    check_call,
    checkpoints,
    draw_images,
    frozen,
    latent_stats,
    optimizer_step,
    owned_by,
    restore_params,
    run_steps,
    save_resume_state,
    sha256,
    square_side,
    start_run,
    tensors_sha256,
    token_ids,
    training_images,
)
from persviz.trainers.class_images import class_images
from persviz.trainers.config_checks import (
    as_class_word,
    as_float,
    as_word,
    check_common_fields,
    default_prompts,
)
from persviz.weight_files import WEIGHT_SUFFIXES, lora_layout, read_weights, weight_keys

LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
FLUX_LAYOUTS = ("diffusers-flux", "kohya-flux")  # weight_files.lora_layout's FLUX.1 LoRAs (diffusers', kohya's)
_ADAPTER = "persviz_dreambooth"
ADAPTER = _ADAPTER  # the adapters' name in the denoiser (persviz.trainers.dreambooth_lora_flux saves them by it)
_FORMAT = 1


@dataclass(frozen=True)
class DreamBoothLoRAConfig:
    """DreamBooth-LoRA settings; the defaults are TEA's runs (rank 4, lr 1e-4, text encoder on, prior weight 1.0).

    Args:
        identifier: the rare word that names the concept in the instance prompt ("sks"); any string without spaces
            (it is tokenized as it comes; no token is added). It must not be a token added to the pipeline (a
            textual-inversion placeholder) nor the class word.
        class_word: the concept's class ("square", "dog").
        instance_prompt: prompt of the reference images; None: "a photo of {identifier} {class_word}".
        class_prompt: prompt of the prior-preservation images; None: "a photo of a {class_word}".
        text_encoder_lr, text_weight_decay: the text encoders' adapters' lr and weight decay (a parameter group of
            their own, as train_dreambooth_lora_sdxl.py's --text_encoder_lr and --adam_weight_decay_text_encoder);
            None: lr and weight_decay (one group, as train_dreambooth_lora.py).
        rank: LoRA rank (lora_alpha = rank, as the example, so the LoRA scale is 1).
        train_text_encoder: LoRA on the text encoder's attention projections too.
        steps: optimizer steps in total (a later call with a larger value extends a finished run).
        resolution: training image size; None: the pipeline's native size (unet sample_size * vae_scale_factor).
        flip_p: probability of a horizontal flip of an image (0: none, as the example).
        max_grad_norm: gradient clipping norm (None: no clipping).
        prior_preservation: train with class images as well (the example's --with_prior_preservation).
        num_class_images, class_seed, class_steps, class_guidance, class_batch_size: the class images; image i is
            generated with seed class_seed + i, class_steps inference steps and guidance class_guidance (the
            pipeline call's defaults 50 and 7.5, as the example), class_batch_size at a time.
    """

    identifier: str = "sks"
    class_word: str = "square"
    instance_prompt: str | None = None
    class_prompt: str | None = None
    rank: int = 4
    train_text_encoder: bool = True
    steps: int = 800
    lr: float = 1e-4
    batch_size: int = 1
    save_every: int = 100
    seed: int = 0
    resolution: int | None = None
    flip_p: float = 0.0
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_seed: int = 0
    class_steps: int = 50
    class_guidance: float = 7.5
    class_batch_size: int = 4
    text_encoder_lr: float | None = None
    text_weight_decay: float | None = None

    def __post_init__(self) -> None:
        as_word(self, "identifier", "sks")
        as_class_word(self)
        if self.identifier == self.class_word:
            raise ValueError("identifier and class_word must differ (the identifier names this one concept)")
        default_prompts(self, f"a photo of {self.identifier} {self.class_word}")
        if self.identifier not in self.instance_prompt:
            raise ValueError(f"instance_prompt {self.instance_prompt!r} does not contain the identifier "
                             f"{self.identifier!r}")
        if self.identifier in self.class_prompt.split():
            raise ValueError(f"class_prompt {self.class_prompt!r} contains the identifier {self.identifier!r}; the "
                             f"class prompt describes the class without it")
        check_common_fields(self, ints=(("rank", 1),), bools=("train_text_encoder",))
        for name in ("text_encoder_lr", "text_weight_decay"):
            if getattr(self, name) is not None:
                as_float(self, name, 0.0, open_low=name == "text_encoder_lr")


DreamBoothLoRAResult = TrainResult  # the name this trainer has always returned (class_images_dir set)


# ----------------------------------------------------------------------------- saved runs


def list_lora_snapshots(out_dir: PathLike) -> list[tuple[int, Path]]:
    """The (step, path) of every checkpoint-{k}/pytorch_lora_weights.safetensors in out_dir, sorted by step."""
    return [(k, p / LORA_FILE) for k, p in checkpoints(out_dir, LORA_FILE)]


def load_dreambooth_lora(pipe: Pipeline, path: PathLike, adapter_name: str | None = None) -> Any:
    """Load a saved LoRA (a file, or a folder holding one: ``find_lora_file``) into pipe; returns pipe.

    diffusers' layout (persviz, diffusers' ``train_dreambooth_lora.py`` / ``train_dreambooth_lora_sdxl.py``:
    ``unet.``, ``text_encoder.``, SDXL's ``text_encoder_2.``) and kohya's / A1111's (``lora_unet_*``, ``lora_te_*``,
    SDXL's ``lora_te1_*`` / ``lora_te2_*``, ``.alpha``), told apart by the keys, read by content (safetensors or torch)
    and passed to ``pipe.load_lora_weights``, which converts kohya's; ``pipe.unload_lora_weights()`` removes it again.
    A LoRA of another model family (an SDXL file on SD 1.x, or the reverse) is refused with a sentence naming both.
    """
    f = find_lora_file(path)
    sd, _, _ = read_weights(f)
    layout = lora_layout(sd)
    if layout is None:
        raise ValueError(f"{f} is not a LoRA in diffusers' or kohya's layout (keys {sorted(sd)[:3]}); pass the LoRA "
                         "file of a DreamBooth-LoRA run")
    why = lora_refusal(sd, pipe, str(f))
    if why is not None:
        raise ValueError(why)
    if (layout in FLUX_LAYOUTS) != (getattr(pipe, "transformer", None) is not None):
        raise ValueError(f"{f} is {'a FLUX.1 (transformer)' if layout in FLUX_LAYOUTS else 'a UNet'} LoRA and the "
                         f"pipeline is not: it was trained on another model; load it into the model it was "
                         "trained on")
    kw = {} if adapter_name is None else {"adapter_name": adapter_name}
    pipe.load_lora_weights(sd, **kw)  # diffusers converts kohya's layout (lora_state_dict)
    return pipe


def find_lora_file(path: PathLike) -> Path:
    """The LoRA file of a path: the file itself, or in a folder pytorch_lora_weights.safetensors (persviz, diffusers'
    train_dreambooth_lora.py), its .bin (the example without safe serialization), else the one weights file
    whose content is a LoRA (kohya / A1111 files have any name). A FileNotFoundError saying what was looked for."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no LoRA weights at {p}; pass a {LORA_FILE} file or a folder holding one")
    for name in (LORA_FILE, "pytorch_lora_weights.bin"):
        if (p / name).is_file():
            return p / name
    found = [f for f in sorted(p.iterdir()) if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES
             and lora_layout(weight_keys(f) or []) is not None]
    if len(found) > 1:
        raise FileNotFoundError(f"{p} holds several LoRA files ({', '.join(f.name for f in found)}); pass one of "
                                "them")
    if not found:
        raise FileNotFoundError(f"no LoRA weights at {p}: no {LORA_FILE} and no file with LoRA keys (diffusers' "
                                "unet.*lora_A / kohya's lora_unet_*.lora_down); pass a LoRA file or a folder holding "
                                "one (list_lora_snapshots(out_dir) lists a run's snapshots)")
    return found[0]


# ----------------------------------------------------------------------------- adapters


def has_lora(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer  # heavy: peft

    return bool(getattr(module, "_hf_peft_config_loaded", False)) or any(
        isinstance(m, BaseTunerLayer) for m in module.modules())


def _remove_lora(module: torch.nn.Module, before: dict) -> None:
    """Replace the LoRA layers by their base layers and drop the attributes peft added (peft_config, flags)."""
    from diffusers.utils import recurse_remove_peft_layers  # heavy: diffusers

    recurse_remove_peft_layers(module)
    for k in [k for k in module.__dict__ if k not in before]:
        del module.__dict__[k]
    for k, v in before.items():
        if k not in ("_modules", "_parameters", "_buffers") and module.__dict__.get(k) is not v:
            module.__dict__[k] = v


def text_prefixes(text_encoders: Any) -> list[tuple[str, Any]]:
    """(prefix, module) of each text encoder as diffusers names them in LoRA files and save_lora_weights' arguments:
    'text_encoder', then 'text_encoder_2' (SDXL's clip_g); `text_encoders`: one module or a sequence of them."""
    mods = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    return [("text_encoder" if i == 0 else f"text_encoder_{i + 1}", m) for i, m in enumerate(mods)]


@contextlib.contextmanager
def lora_adapters(unet: Any, text_encoders: Any, config: DreamBoothLoRAConfig,
                  targets: tuple[str, ...] = UNET_TARGETS) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Adds the adapters (float32, deterministic init); yields {"unet.<name>" / "text_encoder.<name>" /
    "text_encoder_2.<name>": param}. unet: the denoiser (FLUX.1's transformer with its targets); text_encoders: the
    text encoder, or a sequence of them (SDXL's two)."""
    from peft import LoraConfig  # heavy: peft

    models = [("unet", unet, targets)]
    if config.train_text_encoder:
        models += [(prefix, m, TEXT_ENCODER_TARGETS) for prefix, m in text_prefixes(text_encoders)]
    before = [dict(m.__dict__) for _, m, _ in models]
    added: list[tuple[Any, dict]] = []
    try:
        params: dict[str, torch.nn.Parameter] = {}
        for (prefix, m, targets), b in zip(models, before):
            lora = LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                              target_modules=list(targets))
            added.append((m, b))
            with torch.random.fork_rng(devices=[]):  # peft's own initialisation draws from the global generator
                m.add_adapter(lora, adapter_name=_ADAPTER)
            found = {f"{prefix}.{n}": p for n, p in m.named_parameters() if ".lora_" in n}
            if not found:
                raise ValueError(f"no module of the {prefix} matches the LoRA targets {list(targets)}")
            params.update(found)
        _, g = step_rng(config.seed, INIT_STREAM)
        with torch.no_grad():
            for n, p in params.items():
                p.data = p.data.float()  # the example's cast_training_params: adapters train in float32
                if ".lora_A." in n:
                    p.copy_(torch.randn(p.shape, generator=g).div_(config.rank))
                else:
                    p.zero_()
        for p in params.values():
            p.requires_grad_(True)
        yield params
    finally:
        for m, b in reversed(added):
            _remove_lora(m, b)


def _lora_state_dicts(unet: Any, text_encoders: Any, with_text_encoder: bool) -> tuple[dict, list[dict]]:
    """The adapters in the diffusers format, as the example saves them (float32 on the CPU): the UNet's, and each
    text encoder's (none when `with_text_encoder` is False)."""
    from diffusers.utils import convert_state_dict_to_diffusers  # heavy: diffusers
    from peft import get_peft_model_state_dict  # heavy: peft

    def sd(m: Any) -> dict:
        raw = convert_state_dict_to_diffusers(get_peft_model_state_dict(m, adapter_name=_ADAPTER))
        return {k: v.detach().float().cpu().contiguous() for k, v in raw.items()}

    return sd(unet), ([sd(m) for _, m in text_prefixes(text_encoders)] if with_text_encoder else [])


def save_lora(folder: Path, unet: Any, text_encoders: Any, with_text_encoder: bool, weight_name: str = LORA_FILE,
              pipeline_class: Any = None) -> None:
    """The adapters as folder/weight_name, in the format pipe.load_lora_weights reads, written by the pipeline
    class's own ``save_lora_weights`` (None: StableDiffusionPipeline's; SDXL: StableDiffusionXLPipeline's, as
    diffusers' train_dreambooth_lora_sdxl.py saves them, each text encoder's adapters as its
    ``<prefix>_lora_layers``: ``text_encoder_lora_layers``, ``text_encoder_2_lora_layers``)."""
    from diffusers import StableDiffusionPipeline  # heavy: diffusers

    u, texts = _lora_state_dicts(unet, text_encoders, with_text_encoder)
    saver = pipeline_class if pipeline_class is not None else StableDiffusionPipeline
    layers = {f"{prefix}_lora_layers": t for (prefix, _), t in zip(text_prefixes(text_encoders), texts)}
    if not layers:
        layers = {"text_encoder_lora_layers": None}
    saver.save_lora_weights(save_directory=str(folder), unet_lora_layers=u, weight_name=weight_name, **layers)


# ----------------------------------------------------------------------------- training


def pipeline_sha256(unet: Any, text_encoder: Any) -> str:
    """A cheap fingerprint of the base pipeline: its first UNet to_k and text-encoder q_proj weights."""
    k = next(m.weight for n, m in unet.named_modules() if n.endswith("to_k") and hasattr(m, "weight"))
    q = next(m.weight for n, m in text_encoder.named_modules() if n.endswith("q_proj") and hasattr(m, "weight"))
    return tensors_sha256(k, q)


def _check_identifier(tokenizer: Any, config: DreamBoothLoRAConfig) -> list[int]:
    """The identifier's token ids; errors if it is an added token or if the instance prompt loses it."""
    tid = single_token_id(tokenizer, config.identifier)
    if tid is not None and tid >= tokenizer.vocab_size:
        raise ValueError(f"identifier {config.identifier!r} is already a token added to the pipeline's tokenizer "
                         f"(id {tid}, a learned embedding); remove it with "
                         f"pipe.unload_textual_inversion({config.identifier!r}), use a fresh pipeline, or pick another "
                         f"identifier such as 'sks'")
    ident = tokenizer(config.identifier, add_special_tokens=False).input_ids
    ids = token_ids(tokenizer, [config.instance_prompt])[0].tolist()
    if not any(ids[i:i + len(ident)] == ident for i in range(len(ids) - len(ident) + 1)):
        raise ValueError(f"the identifier {config.identifier!r} is not a word of the instance prompt "
                         f"{config.instance_prompt!r} after tokenization (cut at {tokenizer.model_max_length} tokens?)")
    return ident


def check_identifier_ids(tokenizer: Any, config: DreamBoothLoRAConfig) -> list[int]:
    """The identifier's token ids, checked as this trainer checks them (for the FLUX.1 trainer)."""
    return _check_identifier(tokenizer, config)


def train_dreambooth_lora(
    pipe: Pipeline,
    images: Any,
    config: DreamBoothLoRAConfig,
    out_dir: PathLike,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    load_result: bool = True,
) -> DreamBoothLoRAResult:
    """Fine-tune LoRA adapters on reference images of one concept; resumes the run already in out_dir, if any.

    Args:
        pipe: a StableDiffusionPipeline without LoRA layers (any device and dtype; the adapters train in float32).
            Its base weights are never changed; the adapters sit in it during training only, and at the end the
            final weights are loaded into it (``pipe.load_lora_weights``).
        images: PIL images or uint8 arrays [H, W, 3] of one size, or a uint8 array [N, H, W, 3]; centre-cropped
            to a square and resized (bicubic) to the training resolution.
        config: DreamBoothLoRAConfig. Resuming requires the same config, images and pipeline; only steps may
            differ, so a finished run is extended by a call with a larger steps.
        out_dir: folder of the run (created); see the module docstring for its files. The class images are
            generated there once (before the first step) and reused by every later call.
        progress: show tqdm progress bars (class images, training).
        callback: called after each step as callback(step, loss), with the current adapters active in pipe; an
            exception raised there stops training, and the next call resumes from the last saved step.
        load_result: load the final LoRA into pipe (False: leave pipe as it was).
    """
    check_call(pipe, config, DreamBoothLoRAConfig)
    stack = text_stack(pipe)
    text = stack.primary
    tokenizer, text_encoder, unet, vae = text.tokenizer, text.encoder, pipe.unet, pipe.vae
    encoders = [e.encoder for e in stack]
    for name, m in (("unet", unet), *text_prefixes(encoders)):
        if has_lora(m):
            raise ValueError(f"pipe's {name} already holds LoRA layers (from pipe.load_lora_weights or an earlier "
                             f"run's result); call pipe.unload_lora_weights() or pass a fresh pipeline")
    ident = _check_identifier(tokenizer, config)
    device, res, pixels = training_images(pipe, images, config)
    # the text encoders' own lr and weight decay are recorded where set (an SD 1.x run's record is as before)
    settings = {k: v for k, v in asdict(config).items()
                if v is not None or k not in ("text_encoder_lr", "text_weight_decay")}
    record = {"format": _FORMAT, **settings, "resolution_used": res, "num_images": len(pixels),
              "images_sha256": sha256(pixels), "identifier_ids": ident,
              "dtype": f"{text_encoder.dtype}/{unet.dtype}", "pipeline_sha256": pipeline_sha256(unet, text_encoder)}
    out, state, history, start = start_run(out_dir, record, owned_by(CHECKPOINT, LORA_FILE, CLASS_DIR), "LoRA weights",
                                           "the LoRA weights of earlier steps: list_lora_snapshots(out_dir)",
                                           final=LORA_FILE)
    final = out / LORA_FILE
    cls_dir = out / CLASS_DIR if config.prior_preservation else None
    if start < config.steps or not final.is_file():
        cls_pixels = None
        if config.prior_preservation and start < config.steps:
            cls_pixels = class_images(pipe, config, cls_dir, res, progress)
        te_dtype, unet_dtype = text_encoder.dtype, unet.dtype
        # eval mode throughout (also for the encodings): the same numbers in every call
        with frozen([*encoders, unet, vae]), lora_adapters(unet, encoders, config) as params:
            plist = list(params.values())
            if state is not None:
                restore_params(params, state["params"],
                               f"{out / RESUME_FILE} holds other adapter weights than this pipeline gets; use a new "
                               f"out_dir")
            opt, scaler = adamw(param_groups(params, config), config, device,
                                torch.float16 in (te_dtype, unet_dtype), state)

            def save_state(k: int) -> None:
                tensors = {n: p.detach().cpu().clone() for n, p in params.items()}
                save_resume_state(out / RESUME_FILE, k, {"params": tensors}, opt, scaler, history)

            def save(folder: Path) -> None:
                save_lora(folder, unet, encoders, config.train_text_encoder, pipeline_class=type(pipe))

            if start < config.steps:
                step = _make_step(pipe, config, pixels, cls_pixels, device, opt, scaler, plist, unet_dtype,
                                  square_side(images))
                run_steps(start=start, steps=config.steps, save_every=config.save_every, step=step,
                          history=history, snapshot=lambda k: atomic_folder(out / f"checkpoint-{k}", save, replace=True),
                          save_state=save_state, after=callback, desc=f"dreambooth-lora {config.identifier}",
                          progress=progress)
            atomic_write(final, lambda tmp: save_lora(tmp.parent, unet, encoders, config.train_text_encoder,
                                                      weight_name=tmp.name, pipeline_class=type(pipe)))
    if load_result:
        pipe.load_lora_weights(str(final))
    return DreamBoothLoRAResult(out_dir=out, steps=config.steps, loss_history=history,
                                snapshot_paths=[p for _, p in list_lora_snapshots(out)], final_path=final,
                                class_images_dir=cls_dir)


def param_groups(params: dict[str, torch.nn.Parameter], config: DreamBoothLoRAConfig) -> Any:
    """The optimizer's parameters: one list (the UNet's and text encoders' adapters at lr and weight_decay), or,
    where the config sets the text encoders' own lr or weight decay and they train, two groups as
    train_dreambooth_lora_sdxl.py builds them (the UNet's; every text encoder's at text_encoder_lr,
    text_weight_decay)."""
    plist = list(params.values())
    if not config.train_text_encoder or (config.text_encoder_lr is None and config.text_weight_decay is None):
        return plist
    unet = [p for n, p in params.items() if n.startswith("unet.")]
    text = [p for n, p in params.items() if not n.startswith("unet.")]
    lr = config.lr if config.text_encoder_lr is None else config.text_encoder_lr
    wd = config.weight_decay if config.text_weight_decay is None else config.text_weight_decay
    return [{"params": unet}, {"params": text, "lr": lr, "weight_decay": wd}]


def _make_step(pipe: Pipeline, config: DreamBoothLoRAConfig, pixels: np.ndarray, cls_pixels: np.ndarray | None,
               device: torch.device, opt: torch.optim.Optimizer, scaler: Any, params: list[torch.Tensor],
               unet_dtype: torch.dtype, side: int) -> Callable[[int], float]:
    """The training step s (inside the adapters' context): batch, noise and timesteps from step_rng(seed, s). What
    the UNet reads comes from the family (``Family.unet_condition``: SD 1.x the last hidden state; SDXL both
    encoders' penultimate states, clip_g's pooled output and the time ids (original size `side` x `side`, crop
    (0, 0), target size the resolution), as train_dreambooth_lora_sdxl.py's compute_time_ids)."""
    family = family_of(pipe)
    stack = text_stack(pipe)
    unet, vae = pipe.unet, pipe.vae
    noising = Noising(pipe)
    flip = config.flip_p > 0
    mean, std = latent_stats(vae, pixels, flip, device)
    if cls_pixels is not None:
        cmean, cstd = latent_stats(vae, cls_pixels, flip, device)
    all_ids = [token_ids(e.tokenizer, [config.instance_prompt, config.class_prompt]).to(device) for e in stack]
    res = int(pixels.shape[1])
    fixed_cond = fixed_added = None
    if not config.train_text_encoder:  # the text encoders do not change: encode the two prompts once
        with torch.no_grad():
            fixed_cond, fixed_added = family.unet_condition(stack, all_ids, all_ids, (side, side), res)
        if fixed_added is not None:
            fixed_added = {k: v.to(unet_dtype) for k, v in fixed_added.items()}
    n_img, B = len(pixels), config.batch_size

    def pick(rng: np.random.Generator, n: int) -> torch.Tensor:
        return torch.from_numpy(draw_images(rng, n, B, config.flip_p)).to(device)

    def step(s: int) -> float:
        rng, g = step_rng(config.seed, s)
        i = pick(rng, n_img)
        m, sd, rows = mean[i], std[i], [0] * B
        if cls_pixels is not None:
            c = pick(rng, len(cls_pixels))
            m, sd, rows = torch.cat([m, cmean[c]]), torch.cat([sd, cstd[c]]), rows + [1] * B
        zt, t, target = noising(m, sd, g, device)
        r = torch.tensor(rows, device=device)
        if fixed_cond is not None:
            cond = fixed_cond[r]
            added = None if fixed_added is None else {k: v[r] for k, v in fixed_added.items()}
        else:  # the text encoders' adapters train: encode through them (SD 1.x: the last hidden state)
            picked = [a[r] for a in all_ids]
            cond, added = family.unet_condition(stack, picked, picked, (side, side), res)
            if added is not None:
                added = {k: v.to(unet_dtype) for k, v in added.items()}
        pred = unet(zt.to(unet_dtype), t, cond.to(unet_dtype), added_cond_kwargs=added).sample.float()
        loss = F.mse_loss(pred[:B], target[:B])
        if cls_pixels is not None:
            loss = loss + config.prior_loss_weight * F.mse_loss(pred[B:], target[B:])
        optimizer_step(loss, opt, scaler, params, config.max_grad_norm)
        return float(loss.detach().cpu())

    return step
