"""Custom Diffusion (Kumari et al. 2023) for any StableDiffusionPipeline: resumable, bit-reproducible.

Follows diffusers' ``examples/custom_diffusion/train_custom_diffusion.py`` (``--freeze_model crossattn_kv``, one
``--modifier_token``): the key and value projections of every cross-attention layer of the UNet (``attn2.to_k``,
``attn2.to_v``) are trained as ``CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False)`` weights initialised
from the base projections, together with the embedding of a new modifier token ("<new1>") initialised from a
one-token word; the instance prompt is "photo of a <new1> square"; noise-prediction MSE on the VAE latents (times
``vae.config.scaling_factor``) noised with the pipeline's scheduler config read as a DDPMScheduler; AdamW (betas
0.9/0.999, eps 1e-8, weight decay 1e-2, constant lr), gradients clipped to norm 1.0. Also as the example:
- the resize augmentation (``augment``, the example's default; its --noaug turns it off): an instance image is
  rescaled to a random size in [R/3, R] (probability 0.66) or [1.2 R, 1.4 R), pasted at a random place on a zero
  (grey) canvas or cropped at random, the prompt gets "a far away " / "very small " (size < 0.6 R) or "zoomed in " /
  "close up " (size > R) in front, and the loss is masked to the pasted region on the latent grid, less a border of
  one latent pixel (this border is cut even without augmentation);
- the masked instance loss is ``((mse * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()`` with a one-channel
  mask, i.e. summed over the latent channels (4 x the plain mean for SD's 4 channels), kept as the example has it;
- the key/value gradient of the first (start) token is cut (the processor's ``detach`` trick);
- prior preservation (``prior_preservation``, off by default here to keep CPU runs small; the example's
  --with_prior_preservation): ``num_class_images`` images of the class prompt generated once by the base pipeline,
  appended to each batch with the class prompt and an unmasked MSE weighted by ``prior_loss_weight``.
TEA (docs/tea.md §8) trained Custom Diffusion with lr 5e-6 for 2000 steps: the defaults here. The rest follows the
example (batch 1 rather than its 4, snapshots every 250 steps as its checkpointing_steps); the modifier is
initialised from the class word by default (the example uses "ktn", a rare token of SD's vocabulary; pass
``initializer="ktn"`` to follow it there; the ShapesWorld tokenizer has no such token).

Differences in mechanics, none in the objective:
- the modifier's row trains as in ``trainers.textual_inversion``: a float32 leaf written into the placeholder's
  positions by a forward hook on the text encoder's input embedding, with a private copy of the tokenizer. The
  example trains the whole embedding matrix and zeroes the other rows' gradients (its weight decay still shrinks
  them a little); here no other row can change;
- images are centre-cropped and resized (bicubic) to the training resolution once, and the augmentation rescales
  that image (bilinear, as the example) rather than the original file;
- when a one-pixel border would leave an empty mask (latent grids of a few pixels, e.g. a small ShapesWorld
  image shrunk to R/3), the mask keeps the whole pasted region instead (the example would divide by zero);
- the batch of step s (images with replacement, flips, sizes, places, prompts, latent sample, noise, timesteps)
  comes from ``step_rng(seed, s)``, so no global random state is read or set, and a resumed run equals an
  uninterrupted one bit for bit on the CPU (on CUDA too with ``torch.use_deterministic_algorithms(True)``).

The pipeline's weights are never changed: during training its cross-attention layers run the trainable processors
and its text encoder has the hook; both are undone on exit, also after an exception or a KeyboardInterrupt. At the
end the final weights are loaded with ``load_custom_diffusion`` (``load_result=False`` leaves pipe as it was).

Files in ``out_dir``: ``config.json`` (the config and a fingerprint of the images and the pipeline, compared on
resume), ``checkpoint-{k}/`` every ``save_every`` steps and the final files in ``out_dir`` itself, each holding
``pytorch_custom_diffusion_weights.safetensors`` (the format of ``unet.save_attn_procs``: keys
``{layer}.processor.to_k_custom_diffusion.weight`` / ``to_v_...``) and ``learned_embeds.safetensors`` (the modifier's
embedding in the diffusers textual-inversion format, read by ``pipe.load_textual_inversion``), ``class_images/``
with prior preservation, and ``resume_state.pt``.

Loading: ``load_custom_diffusion(pipe, folder)``. diffusers' own ``pipe.unet.load_attn_procs(file)`` reads the
weights file but, in diffusers 0.42, installs nothing (it sets the processors only when called by a pipeline
loader; diffusers issue #9320), and with a .safetensors file it would also pass too few processors to
``set_attn_processor``. ``load_custom_diffusion`` therefore builds the same ``CustomDiffusionAttnProcessor``s as
diffusers' parser does and installs them beside the other layers' processors.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from persviz.families.base import Pipeline
from persviz.families import text_stack
from persviz.embedding_files import check_fits, read_embedding_file
from persviz.embeddings import class_word_id, load_learned_token, save_learned_embeds
from persviz.io import PathLike, atomic_folder, atomic_write
from persviz.seeding import step_rng
from persviz.text_stack import PlaceholderRows
from persviz.trainers.core import (
    CHECKPOINT,
    CLASS_DIR,
    RESUME_FILE,
    Noising,
    TrainResult,
    adamw,
    check_call,
    checkpoints,
    draw_images,
    encode_stats,
    frozen,
    latent_stats,
    optimizer_step,
    owned_by,
    placeholder_positions,
    restore_params,
    run_steps,
    save_resume_state,
    sha256,
    start_run,
    tensors_sha256,
    token_ids,
    training_images,
)
from persviz.trainers.class_images import class_images
from persviz.trainers.config_checks import (
    as_class_word,
    as_word,
    check_common_fields,
    check_new_token,
    default_prompts,
)
from persviz.weight_files import read_weights

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"
WEIGHTS_BIN = "pytorch_custom_diffusion_weights.bin"  # unet.save_attn_procs(safe_serialization=False)
EMBEDS_FILE = "learned_embeds.safetensors"
AUG_PREFIXES: tuple[str, ...] = ("", "a far away ", "very small ", "zoomed in ", "close up ")  # the example's
_KV = ("to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight")
_FORMAT = 1


@dataclass(frozen=True)
class CustomDiffusionConfig:
    """Custom Diffusion settings; the defaults are TEA's runs (lr 5e-6, 2000 steps) and the example's recipe.

    Args:
        modifier_token: the new token, e.g. "<new1>"; must not be a token of the pipeline's tokenizer yet.
        class_word: the concept's class ("square", "dog").
        initializer: one-token word whose embedding initialises the modifier; None: the class word.
        instance_prompt: prompt of the reference images, holding the modifier once; None:
            "photo of a {modifier_token} {class_word}".
        class_prompt: prompt of the prior-preservation images; None: "a photo of a {class_word}".
        steps: optimizer steps in total (a later call with a larger value extends a finished run).
        resolution: training image size; None: the pipeline's native size (unet sample_size * vae_scale_factor).
        flip_p: probability of a horizontal flip (the example's --hflip is 0.5; off by default as there).
        augment: the example's resize augmentation with its masked loss (see the module docstring).
        max_grad_norm: gradient clipping norm (None: no clipping).
        prior_preservation: train with class images as well (off by default).
        num_class_images, class_seed, class_steps, class_guidance, class_batch_size: the class images (200 as the
            example; image i is generated with seed class_seed + i, the pipeline call's defaults 50 steps and
            guidance 7.5, class_batch_size at a time).
    """

    modifier_token: str = "<new1>"
    class_word: str = "square"
    initializer: str | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None
    steps: int = 2000
    lr: float = 5e-6
    batch_size: int = 1
    save_every: int = 250
    seed: int = 0
    resolution: int | None = None
    flip_p: float = 0.0
    augment: bool = True
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 200
    class_seed: int = 0
    class_steps: int = 50
    class_guidance: float = 7.5
    class_batch_size: int = 4

    def __post_init__(self) -> None:
        as_word(self, "modifier_token", "<new1>")
        as_class_word(self)
        if self.initializer is None:
            object.__setattr__(self, "initializer", self.class_word)
        if not isinstance(self.initializer, str) or not self.initializer.strip():
            raise ValueError(f"initializer must be a one-token word such as the class word; got {self.initializer!r}")
        if self.modifier_token in (self.class_word, self.initializer):
            raise ValueError("modifier_token must differ from the class word and the initializer (it is a new token)")
        default_prompts(self, f"photo of a {self.modifier_token} {self.class_word}")
        if self.instance_prompt.count(self.modifier_token) != 1:
            raise ValueError(f"instance_prompt {self.instance_prompt!r} must hold the modifier token "
                             f"{self.modifier_token!r} once")
        if self.modifier_token in self.class_prompt:
            raise ValueError(f"class_prompt {self.class_prompt!r} must not hold the modifier token")
        check_common_fields(self, bools=("augment",))


# The name this trainer has always returned: snapshot_paths are the checkpoint-{k} folders; final_path the final
# weights file and embedding_path the final modifier embedding (``load_custom_diffusion(pipe, out_dir)`` loads both).
CustomDiffusionResult = TrainResult


# ----------------------------------------------------------------------------- saved runs


KEY_MARK = "_custom_diffusion."  # diffusers names the processors' weights '...processor.to_k_custom_diffusion.weight'


def list_custom_diffusion_snapshots(out_dir: PathLike) -> list[tuple[int, Path]]:
    """The (step, folder) of every checkpoint-{k} folder in out_dir holding the weights file, sorted by step."""
    return checkpoints(out_dir, WEIGHTS_FILE)


def _group(state_dict: dict[str, torch.Tensor], where: Any) -> dict[str, dict[str, torch.Tensor]]:
    """{processor name: {sub key: tensor}} of a Custom Diffusion state dict (diffusers' _process_custom_diffusion)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    if not state_dict:
        raise ValueError(f"{where} holds no weights; it is not a Custom Diffusion weights file")
    for key, v in state_dict.items():
        if KEY_MARK not in key:
            raise ValueError(f"{where} is not a Custom Diffusion weights file (key {key!r})")
        n = 3 if "to_out" in key else 2
        parts = key.split(".")
        groups.setdefault(".".join(parts[:-n]), {})[".".join(parts[-n:])] = v
    return groups


def load_custom_diffusion(pipe: Pipeline, path: PathLike, token: str | None = None) -> Any:
    """Load saved Custom Diffusion weights (and the modifier's embedding beside them) into pipe; returns pipe.

    Args:
        path: a folder holding pytorch_custom_diffusion_weights.safetensors or .bin (a run's out_dir, a checkpoint-{k}
            folder, or the output folder of diffusers' train_custom_diffusion.py), or that file; the modifier
            embedding next to it (learned_embeds.safetensors, or the example's ``<new1>.bin``:
            ``custom_diffusion_embeddings``) is loaded with pipe.load_textual_inversion.
        token: load the embedding under this token instead of the stored one.
    The processors are the ones diffusers' ``unet.load_attn_procs`` builds; see the module docstring for why it is
    not called. To undo: ``pipe.unet.set_attn_processor(AttnProcessor2_0())`` and
    ``pipe.unload_textual_inversion(token)`` (or use a fresh pipeline).
    """
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor  # heavy: diffusers

    weights = custom_diffusion_weights(path)
    unet = pipe.unet
    procs = dict(unet.attn_processors)
    groups = _group(read_custom_diffusion_weights(weights), weights)
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global generator
        for name, sd in groups.items():
            if name not in procs:
                raise ValueError(f"{weights} holds weights of a layer {name!r} this pipeline's unet does not have")
            k = sd["to_k_custom_diffusion.weight"]
            proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in sd,
                                                hidden_size=k.shape[0], cross_attention_dim=k.shape[1])
            proc.load_state_dict(sd)
            procs[name] = proc.to(device=unet.device, dtype=unet.dtype)
    embeds = [read_embedding_file(f) for f in custom_diffusion_embeddings(weights.parent)]
    if token is not None and len(embeds) > 1:
        raise ValueError(f"{weights.parent} holds {len(embeds)} modifier tokens; load it without token=")
    for e in embeds:
        check_fits(e, text_stack(pipe).primary.encoder)
    unet.set_attn_processor(procs)
    weight = text_stack(pipe).primary.rows
    for e in embeds:
        load_learned_token(pipe, {token or e.token: e.rows.to(weight.dtype)}, token=token or e.token)
    return pipe


def custom_diffusion_weights(path: PathLike) -> Path:
    """The processor weights of a Custom Diffusion run: the file itself, or a folder's
    pytorch_custom_diffusion_weights.safetensors (persviz; diffusers' train_custom_diffusion.py) or .bin (the
    example with --no_safe_serialization); a FileNotFoundError naming both."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for name in (WEIGHTS_FILE, WEIGHTS_BIN):
        if (p / name).is_file():
            return p / name
    raise FileNotFoundError(f"no Custom Diffusion weights at {p} ({WEIGHTS_FILE} or {WEIGHTS_BIN}); pass a folder "
                            "holding one or the file (list_custom_diffusion_snapshots(out_dir) lists a run's snapshots)")


def read_custom_diffusion_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a Custom Diffusion weights file, read by content (safetensors, or the torch file of
    ``unet.save_attn_procs(..., safe_serialization=False)``, whose empty entries for weightless processors are
    dropped)."""
    sd, _, _ = read_weights(path)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def custom_diffusion_embeddings(folder: PathLike) -> list[Path]:
    """The modifier-token embeddings of a Custom Diffusion run folder: learned_embeds.safetensors (persviz), else
    each ``<token>.bin`` that diffusers' train_custom_diffusion.py writes (save_new_embed: safetensors bytes in a
    .bin, or a torch file), recognised by content."""
    d = Path(folder).expanduser()
    if (d / EMBEDS_FILE).is_file():
        return [d / EMBEDS_FILE]
    out = []
    for f in sorted(d.iterdir()) if d.is_dir() else []:
        if f.is_file() and f.suffix in (".bin", ".safetensors") and f.name not in (WEIGHTS_FILE, WEIGHTS_BIN):
            try:
                e = read_embedding_file(f)
            except ValueError:
                continue
            if e.format in ("custom-diffusion", "diffusers"):
                out.append(f)
    return out


# ----------------------------------------------------------------------------- processors


def _cross_attention(unet: Any) -> dict[str, Any]:
    """{processor name: Attention module} of the UNet's cross-attention layers (attn2 in SD)."""
    out = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name[:-len(".processor")])
        if getattr(attn, "is_cross_attention", False):
            if attn.to_k.bias is not None or attn.to_v.bias is not None:
                raise ValueError(f"{name}: key/value projections with a bias are not supported (SD has none)")
            out[name] = attn
    if not out:
        raise ValueError("the pipeline's unet has no cross-attention layers")
    return out


@contextlib.contextmanager
def _kv_processors(unet: Any, cross: dict[str, Any], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Installs trainable processors on the cross-attention layers (K/V float32, copied from the base projections);
    yields {"{name}.to_k_custom_diffusion.weight" / ...: param}; the original processors come back on exit."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor  # heavy: diffusers

    original = dict(unet.attn_processors)
    params: dict[str, torch.Tensor] = {}
    procs = {}
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global generator
        for name, attn in cross.items():
            proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
                                                cross_attention_dim=attn.to_k.in_features).to(device)
            with torch.no_grad():
                proc.to_k_custom_diffusion.weight.copy_(attn.to_k.weight.float())
                proc.to_v_custom_diffusion.weight.copy_(attn.to_v.weight.float())
            procs[name] = proc
            params[f"{name}.{_KV[0]}"] = proc.to_k_custom_diffusion.weight
            params[f"{name}.{_KV[1]}"] = proc.to_v_custom_diffusion.weight
    try:
        unet.set_attn_processor({**original, **procs})
        for p in params.values():
            p.requires_grad_(True)
        yield params
    finally:
        unet.set_attn_processor(dict(original))


def _save(folder: Path, params: dict[str, torch.Tensor], token: str, row: torch.Tensor) -> None:
    """The weights file (unet.save_attn_procs's keys) and the modifier's embedding, each written atomically."""
    state = {n: p.detach().float().cpu().contiguous() for n, p in params.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    save_learned_embeds({token: row.detach().float().cpu().clone()}, folder / EMBEDS_FILE)


def _has_custom_diffusion(unet: Any) -> bool:
    return any("CustomDiffusion" in type(p).__name__ for p in unet.attn_processors.values())


def instance_mask(res: int, f: int, scale: int, top: int, left: int) -> np.ndarray:
    """The example's valid-region mask on the latent grid [res//f, res//f] (see the module docstring)."""
    h = res // f
    m = np.zeros((h, h), dtype=np.float32)
    if scale > res:
        m[:] = 1.0
        return m
    r0, r1, c0, c1 = top // f + 1, (top + scale) // f - 1, left // f + 1, (left + scale) // f - 1
    if r1 <= r0 or c1 <= c0:  # a one-pixel border leaves nothing: keep the whole pasted region
        r0, r1, c0, c1 = top // f, -(-(top + scale) // f), left // f, -(-(left + scale) // f)
    m[r0:r1, c0:c1] = 1.0
    return m


def augmented(pixels: np.ndarray, i: int, flip: bool, scale: int, top: int, left: int) -> np.ndarray:
    """float32 [R, R, 3] in [-1, 1]: image i (mirrored if flip) resized to scale, pasted on zeros or cropped."""
    res = pixels.shape[1]
    a = pixels[i, :, ::-1] if flip else pixels[i]
    if scale != res:
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((scale, scale), Image.Resampling.BILINEAR))
    x = (a.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    if scale > res:
        return np.ascontiguousarray(x[top:top + res, left:left + res])
    canvas = np.zeros((res, res, 3), dtype=np.float32)
    canvas[top:top + scale, left:left + scale] = x
    return canvas


# ----------------------------------------------------------------------------- training


def train_custom_diffusion(
    pipe: Pipeline,
    images: Any,
    config: CustomDiffusionConfig,
    out_dir: PathLike,
    progress: bool = True,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    load_result: bool = True,
) -> CustomDiffusionResult:
    """Learn cross-attention K/V and a modifier token from reference images; resumes the run in out_dir, if any.

    Args:
        pipe: a StableDiffusionPipeline (any device and dtype; K/V and the row train in float32). Its weights are
            not changed; at the end the final result is loaded into it (``load_custom_diffusion``).
        images: PIL images or uint8 arrays [H, W, 3] of one size, or a uint8 array [N, H, W, 3]; centre-cropped
            to a square and resized (bicubic) to the training resolution.
        config: CustomDiffusionConfig. Resuming requires the same config, images and pipeline; only steps may
            differ, so a finished run is extended by a call with a larger steps.
        out_dir: folder of the run (created); see the module docstring for its files.
        progress: show tqdm progress bars.
        callback: called after each step as callback(step, loss, modifier embedding float32 [1, D] on the CPU); an
            exception raised there stops training, and the next call resumes from the last saved step.
        load_result: load the final result into pipe (False: leave pipe as it was).
    """
    check_call(pipe, config, CustomDiffusionConfig)
    text = text_stack(pipe).primary
    tokenizer, text_encoder, unet, vae = text.tokenizer, text.encoder, pipe.unet, pipe.vae
    mod = config.modifier_token
    check_new_token(tokenizer, mod, "modifier_token",
                    f"remove it with pipe.unload_textual_inversion({mod!r}) or use a fresh pipeline")
    if _has_custom_diffusion(unet):
        raise ValueError("pipe's unet already runs Custom Diffusion processors (an earlier result?); use a fresh "
                         "pipeline or reset them with pipe.unet.set_attn_processor(AttnProcessor2_0())")
    init_id = class_word_id(tokenizer, config.initializer)
    tok = copy.deepcopy(tokenizer)
    if tok.add_tokens([mod]) != 1:
        raise ValueError(f"the tokenizer already holds {mod!r}; pick another modifier_token")
    mod_id = tok.convert_tokens_to_ids(mod)
    cross = _cross_attention(unet)

    device, res, pixels = training_images(pipe, images, config)
    prompts = [pre + config.instance_prompt for pre in AUG_PREFIXES] + [config.class_prompt]
    ids = token_ids(tok, prompts)
    is_mod, sel = placeholder_positions(ids, [mod_id])
    for p, n in zip(prompts, is_mod.sum(1).tolist()):
        if n != (p != config.class_prompt):
            raise ValueError(f"prompt {p!r} holds the modifier token {n} times after tokenization (cut at "
                             f"{tok.model_max_length} tokens?); the instance prompt must hold it once")
    ids_table = torch.where(is_mod, init_id, ids).to(device)  # the modifier's positions read the initializer
    mask_table, sel_table = is_mod.to(device), sel.to(device)
    W = text_encoder.get_input_embeddings().weight
    first_kv = next(iter(cross.values()))
    record = {"format": _FORMAT, **asdict(config), "resolution_used": res, "num_images": len(pixels),
              "images_sha256": sha256(pixels), "embedding_shape": list(W.shape),
              "dtype": f"{text_encoder.dtype}/{unet.dtype}", "cross_attention_layers": len(cross),
              "initializer_row_sha256": tensors_sha256(W[init_id]),
              "pipeline_sha256": tensors_sha256(first_kv.to_k.weight, first_kv.to_v.weight)}
    out, state, history, start = start_run(
        out_dir, record, owned_by(CHECKPOINT, WEIGHTS_FILE, EMBEDS_FILE, CLASS_DIR), "Custom Diffusion weights",
        "the weights of earlier steps: list_custom_diffusion_snapshots(out_dir)",
        final=(WEIGHTS_FILE, EMBEDS_FILE))
    cls_dir = out / CLASS_DIR if config.prior_preservation else None
    finals_there = (out / WEIGHTS_FILE).is_file() and (out / EMBEDS_FILE).is_file()
    if start < config.steps or not finals_there:
        cls_pixels = None
        if config.prior_preservation and start < config.steps:
            cls_pixels = class_images(pipe, config, cls_dir, res, progress)
        te_dtype, unet_dtype = text_encoder.dtype, unet.dtype
        row0 = W[init_id].detach().float().to(device)[None]
        rows = (state["rows"].to(device) if state is not None else row0).clone().requires_grad_(True)
        with PlaceholderRows(rows).hooked(text_encoder) as hook, frozen([text_encoder, unet, vae]), \
                _kv_processors(unet, cross, device) as kv:
            plist = [rows, *kv.values()]
            if state is not None:
                restore_params(kv, state["kv"],
                               f"{out / RESUME_FILE} holds weights of other layers than this pipeline has; use a "
                               f"new out_dir")
            opt, scaler = adamw(plist, config, device, torch.float16 in (te_dtype, unet_dtype), state)

            def save_state(k: int) -> None:
                tensors = {"rows": rows.detach().cpu().clone(),
                           "kv": {n: p.detach().cpu().clone() for n, p in kv.items()}}
                save_resume_state(out / RESUME_FILE, k, tensors, opt, scaler, history)

            def after(k: int, loss: float) -> None:
                if callback is not None:
                    callback(k, loss, rows.detach().float().cpu().clone())

            if start < config.steps:
                step = _make_step(pipe, config, pixels, cls_pixels, device, opt, scaler, plist, unet_dtype, hook,
                                  (ids_table, mask_table, sel_table))
                run_steps(start=start, steps=config.steps, save_every=config.save_every, step=step,
                          history=history,
                          snapshot=lambda k: atomic_folder(out / f"checkpoint-{k}",
                                                           lambda d: _save(d, kv, mod, rows), replace=True),
                          save_state=save_state, after=after, desc=f"custom diffusion {mod}", progress=progress)
            _save(out, kv, mod, rows)
    if load_result:
        load_custom_diffusion(pipe, out)
    return CustomDiffusionResult(out_dir=out, steps=config.steps, loss_history=history,
                                 snapshot_paths=[p for _, p in list_custom_diffusion_snapshots(out)],
                                 final_path=out / WEIGHTS_FILE, embedding_path=out / EMBEDS_FILE,
                                 class_images_dir=cls_dir)


def _make_step(pipe: Pipeline, config: CustomDiffusionConfig, pixels: np.ndarray, cls_pixels: np.ndarray | None,
               device: torch.device, opt: torch.optim.Optimizer, scaler: Any, params: list[torch.Tensor],
               unet_dtype: torch.dtype, hook: PlaceholderRows,
               tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Callable[[int], float]:
    """The training step s: the example's augmentation, batch, noise and timesteps from step_rng(seed, s)."""
    text_encoder, unet, vae = text_stack(pipe).primary.encoder, pipe.unet, pipe.vae
    ids_table, mask_table, sel_table = tables
    noising = Noising(pipe)
    res, n_img, B = pixels.shape[1], len(pixels), config.batch_size
    f = int(getattr(pipe, "vae_scale_factor", 8))
    if cls_pixels is not None:
        cmean, cstd = latent_stats(vae, cls_pixels, config.flip_p > 0, device)
    cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}  # unaugmented images: encode once

    def instance(i: int, flip: bool, scale: int, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
        if scale == res and (i, flip) in cache:
            return cache[i, flip]
        x = torch.from_numpy(augmented(pixels, i, flip, scale, top, left)).permute(2, 0, 1)[None]
        stats = encode_stats(vae, x, device)
        if scale == res:
            cache[i, flip] = stats
        return stats

    def step(s: int) -> float:
        rng, g = step_rng(config.seed, s)
        means, stds, masks, rows = [], [], [], []
        for _ in range(B):  # the example's __getitem__: image, flip, size, place, prompt
            i = int(rng.integers(n_img))
            flip = bool(config.flip_p > 0 and rng.random() < config.flip_p)
            scale = res
            if config.augment:
                if rng.random() < 0.66:
                    scale = int(rng.integers(res // 3, res + 1))
                else:
                    lo = int(1.2 * res)
                    scale = int(rng.integers(lo, max(int(1.4 * res), lo + 1)))
            outer, inner = (scale, res) if scale > res else (res, scale)
            top, left = (int(v) for v in rng.integers(0, outer - inner + 1, size=2))
            row = 0
            if scale < 0.6 * res:
                row = 1 + int(rng.integers(2))
            elif scale > res:
                row = 3 + int(rng.integers(2))
            m, sd = instance(i, flip, scale, top, left)
            means.append(m)
            stds.append(sd)
            masks.append(instance_mask(res, f, scale, top, left))
            rows.append(row)
        m, sd = torch.cat(means), torch.cat(stds)
        if cls_pixels is not None:
            c = torch.from_numpy(draw_images(rng, len(cls_pixels), B, config.flip_p)).to(device)
            m, sd, rows = torch.cat([m, cmean[c]]), torch.cat([sd, cstd[c]]), rows + [len(AUG_PREFIXES)] * B
        zt, t, target = noising(m, sd, g, device)
        r = torch.tensor(rows, device=device)
        hook.mask, hook.sel = mask_table[r], sel_table[r]
        try:
            cond = text_encoder(ids_table[r])[0].to(unet_dtype)
        finally:
            hook.mask = None
        pred = unet(zt.to(unet_dtype), t, cond).sample.float()
        mask = torch.from_numpy(np.stack(masks))[:, None].to(device)
        err = F.mse_loss(pred[:B], target[:B], reduction="none")
        loss = ((err * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
        if cls_pixels is not None:
            loss = loss + config.prior_loss_weight * F.mse_loss(pred[B:], target[B:])
        optimizer_step(loss, opt, scaler, params, config.max_grad_norm)
        return float(loss.detach().cpu())

    return step
