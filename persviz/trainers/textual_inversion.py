"""Textual Inversion (Gal et al. 2022) for any StableDiffusionPipeline: resumable, bit-reproducible, float32 rows.

Follows diffusers' ``examples/textual_inversion/textual_inversion.py``: placeholder token(s) initialised from a
one-token class word; noise-prediction MSE on the VAE latents of the reference images (times
``vae.config.scaling_factor``), noised with the pipeline's scheduler config read as a DDPMScheduler; prompts from
random templates ("a photo of a {}"); AdamW (betas 0.9/0.999, eps 1e-8, weight decay 1e-2, constant lr);
random horizontal flips (p 0.5). TEA (docs/tea.md §8) trained with lr 5e-4, batch 1, 3000 steps and an
embedding saved every 100 steps: the defaults here.

One change of mechanics, same result. The example optimises the whole input-embedding matrix and after every
step restores all rows but the placeholder's (``index_no_updates``). Here the optimiser holds only the
placeholder row(s), a float32 leaf [n, D] that a forward hook on the text encoder's input embedding writes into
the placeholder's positions. AdamW acts elementwise, so the row follows the example's trajectory (a test
checks this step by step), and:
- no other row can change;
- the row trains in float32 even in a float16 pipeline: the hook casts it to the encoder's dtype, its gradient
  arrives in float32, and a GradScaler keeps float16 gradients from underflowing;
- the resume state holds one row and its optimiser state, not the whole matrix.

The pipeline passed in is not changed during training. A private copy of its tokenizer holds the placeholder;
the hook, the frozen ``requires_grad`` flags and the train/eval modes are restored on exit, also after an
exception or a KeyboardInterrupt. So after an interruption the same pipeline object can be passed again, and
the run resumes. At the end the final embedding is loaded into the pipeline with ``pipe.load_textual_inversion``
(``load_result=False`` leaves the pipeline untouched).

Files in ``out_dir``: ``config.json`` (the config and a fingerprint of the images and the pipeline, compared on
resume), ``learned_embeds-steps-{k}.safetensors`` every ``save_every`` steps and ``learned_embeds.safetensors``
at the end (diffusers format, read by ``pipe.load_textual_inversion``), and ``resume_state.pt`` (row, optimiser,
scaler, losses, step), written with the embedding files and at the last step.

Reproducibility: the batch, the template, the flip, the latent sample, the noise and the timestep of step s come
from ``step_rng(seed, s)`` (persviz.seeding) and nothing else; no global random state is read or set.
A resumed run therefore equals an uninterrupted one bit for bit on the CPU. On CUDA it does too when the kernels
are deterministic (``torch.use_deterministic_algorithms(True)``, left to the caller since it is global).
"""
from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from persviz.families.base import Pipeline
from persviz.families import family_of, text_stack
from persviz.embedding_files import EmbeddingFile, EmbeddingFileError, check_fits, read_embedding_file
from persviz.embeddings import class_word_id, load_learned_token, save_encoder_embeds, save_learned_embeds
from persviz.io import PathLike
from persviz.seeding import step_rng
from persviz.text_stack import PlaceholderRows
from persviz.trainers.config_checks import as_int, as_word, check_new_token, check_resolution
from persviz.trainers.core import (  # CONFIG_FILE and RESUME_FILE are read from here too (persviz.tea.tracker, tests)
    CONFIG_FILE,
    RESUME_FILE,
    Noising,
    TrainResult,
    adamw,
    check_call,
    draw_images,
    frozen,
    latent_stats,
    numbered,
    optimizer_step,
    owned_by,
    placeholder_positions,
    run_steps,
    save_resume_state,
    sha256,
    square_side,
    start_run,
    tensors_sha256,
    token_ids,
    training_images,
)

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)  # imagenet_templates_small of the diffusers example

FINAL_FILE = "learned_embeds.safetensors"
_STEP_FILE = re.compile(r"learned_embeds-steps-(\d+)\.safetensors")
_ANY_STEP_FILE = re.compile(r"learned_embeds-steps-(\d+)\.(?:safetensors|bin)")  # .bin: the example's --no_safe_serialization
_A1111_STEP_FILE = re.compile(r"(.+)-(\d+)\.pt")  # A1111: embeddings/<name>-<step>.pt
_A1111_IMAGE_FILE = re.compile(r"(.+)-(\d+)\.(?:png|webp|avif|jxl)")  # A1111: image_embeddings/<name>-<step>.png
_KOHYA_STEP_FILE = re.compile(r"(.+)-step(\d{8})\.(?:safetensors|pt)")  # kohya: <output_name>-step{:08d}
_ORIGINAL_STEP_FILE = re.compile(r"embeddings_gs-(\d+)\.pt")  # the original Textual Inversion's checkpoints/
A1111_EMBEDDINGS = "embeddings"
A1111_IMAGE_EMBEDDINGS = "image_embeddings"
_FORMAT = 1


@dataclass(frozen=True)
class TextualInversionConfig:
    """Textual Inversion settings; the defaults are TEA's runs (lr 5e-4, batch 1, 3000 steps, saved every 100).

    Args:
        placeholder: the new token, e.g. "<v*>"; must not be a token of the pipeline's tokenizer yet.
        initializer: one-token class word whose embedding initialises the placeholder row(s).
        num_vectors: rows learned for the placeholder (diffusers names the extra ones "<v*>_1", ...).
        steps: optimizer steps in total (a later call with a larger value extends a finished run).
        templates: prompts with one "{}" for the placeholder; for ShapesWorld e.g. ("a {}",).
        resolution: training image size; None: the pipeline's native size (unet sample_size * vae_scale_factor).
        flip_p: probability of a horizontal flip of a reference image (0: none).
    """

    placeholder: str = "<v*>"
    initializer: str = "square"
    num_vectors: int = 1
    steps: int = 3000
    lr: float = 5e-4
    batch_size: int = 1
    save_every: int = 100
    seed: int = 0
    templates: tuple[str, ...] = OBJECT_TEMPLATES
    resolution: int | None = None
    flip_p: float = 0.5
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        if isinstance(self.templates, str):
            raise ValueError(f"templates must be a sequence of strings, not one string; wrap it: ({self.templates!r},)")
        object.__setattr__(self, "templates", tuple(self.templates))
        for name, low in (("num_vectors", 1), ("steps", 1), ("batch_size", 1), ("save_every", 1), ("seed", 0)):
            as_int(self, name, low)
        as_word(self, "placeholder", "<v*>")
        if not isinstance(self.initializer, str) or not self.initializer.strip():
            raise ValueError(f"initializer must be a class word such as 'square' or 'dog'; got {self.initializer!r}")
        if self.placeholder == self.initializer:
            raise ValueError("placeholder and initializer must differ (the placeholder is a new token)")
        if not (float(self.lr) > 0 and np.isfinite(self.lr)) or not (float(self.weight_decay) >= 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0; got {self.lr}, {self.weight_decay}")
        if not 0.0 <= float(self.flip_p) <= 1.0:
            raise ValueError(f"flip_p must lie in [0, 1]; got {self.flip_p}")
        if not self.templates:
            raise ValueError("templates is empty; pass at least one prompt with '{}' for the placeholder")
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"each template must be a string with exactly one '{{}}'; got {t!r}")
        check_resolution(self)
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        object.__setattr__(self, "flip_p", float(self.flip_p))

    @property
    def tokens(self) -> list[str]:
        """The placeholder's token names, diffusers' convention: ["<v*>", "<v*>_1", ...]."""
        return [self.placeholder] + [f"{self.placeholder}_{i}" for i in range(1, self.num_vectors)]


TextualInversionResult = TrainResult  # the name this trainer has always returned: one result class for all trainers


# ----------------------------------------------------------------------------- saved runs


def list_snapshots(out_dir: PathLike) -> list[tuple[int, Path]]:
    """The (step, path) of every snapshot of a Textual Inversion run folder, sorted by step.

    diffusers' naming first (persviz and diffusers' ``examples/textual_inversion/textual_inversion.py``:
    ``learned_embeds-steps-{k}.safetensors``, ``.bin`` with its --no_safe_serialization); else kohya's
    (``<name>-step{k:08d}.safetensors`` / ``.pt``), the original Textual Inversion's (``embeddings_gs-{k}.pt``, in
    the folder or its ``checkpoints/``), Automatic1111's (``textual_inversion/<date>/<name>/embeddings/<name>-{k}.pt``:
    the ``<name>`` folder or its ``embeddings/``, else its ``image_embeddings/<name>-{k}.png``). k is the step in the
    tool's convention (``embedding_files`` module docstring). The files' format is read from their content."""
    found = numbered(out_dir, _ANY_STEP_FILE)  # FileNotFoundError for a missing folder
    for finder in (kohya_snapshots, original_snapshots, a1111_snapshots):
        found = found or finder(out_dir)
    return found


def kohya_snapshots(folder: PathLike) -> list[tuple[int, Path]]:
    """The (step, path) of kohya's ``<name>-step{k:08d}.safetensors`` / ``.pt`` snapshots (one run's) in folder."""
    hits = [(m.group(1), int(m.group(2)), p) for p in sorted(Path(folder).expanduser().iterdir())
            if p.is_file() and (m := _KOHYA_STEP_FILE.fullmatch(p.name))]
    _one_run(Path(folder), {n for n, _, _ in hits})
    return sorted((k, p) for _, k, p in hits)


def original_snapshots(folder: PathLike) -> list[tuple[int, Path]]:
    """The (step, path) of the original Textual Inversion's ``embeddings_gs-{k}.pt`` in folder or its checkpoints/."""
    d = Path(folder).expanduser()
    d = d / "checkpoints" if (d / "checkpoints").is_dir() else d
    return numbered(d, _ORIGINAL_STEP_FILE, lambda p: p.is_file())


def _one_run(d: Path, names: set[str]) -> None:
    if len(names) > 1:
        raise ValueError(f"{d} holds the snapshots of several embeddings ({', '.join(sorted(names))}); pass the "
                         "folder of one training run (A1111's textual_inversion/<date>/<name>, kohya's output_dir of "
                         "one --output_name)")


def a1111_snapshots(folder: PathLike) -> list[tuple[int, Path]]:
    """The (step, path) of Automatic1111's ``<name>-{k}.pt`` snapshots in folder (or its ``embeddings/``)."""
    base = Path(folder).expanduser()
    for d, pattern in ((base / A1111_EMBEDDINGS, _A1111_STEP_FILE), (base, _A1111_STEP_FILE),
                       (base / A1111_IMAGE_EMBEDDINGS, _A1111_IMAGE_FILE), (base, _A1111_IMAGE_FILE)):
        if not d.is_dir():
            continue
        hits = [(m.group(1), int(m.group(2)), p) for p in sorted(d.iterdir())
                if p.is_file() and (m := pattern.fullmatch(p.name))]
        if hits:
            _one_run(d, {n for n, _, _ in hits})
            return sorted((k, p) for _, k, p in hits)
    return []


def final_embedding(path: PathLike) -> Path:
    """The final embedding of a run: the file itself, or a folder's learned_embeds.safetensors / .bin (diffusers),
    else A1111's ``<name>.pt`` beside its snapshots, else the run's last snapshot."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for name in (FINAL_FILE, "learned_embeds.bin"):
        if (p / name).is_file():
            return p / name
    snaps = list_snapshots(p)
    if not snaps:
        raise FileNotFoundError(f"{p} holds no Textual Inversion embedding ({FINAL_FILE}, learned_embeds-steps-<k> "
                                "snapshots or A1111's <name>-<k>.pt); pass a run folder or an embedding file")
    last = snaps[-1][1]
    kohya = _KOHYA_STEP_FILE.fullmatch(last.name)
    if kohya:  # kohya's train_util.get_last_ckpt_name: <output_name>.<ext> beside the snapshots
        for ext in (".safetensors", ".pt"):
            if (last.parent / f"{kohya.group(1)}{ext}").is_file():
                return last.parent / f"{kohya.group(1)}{ext}"
    if _ORIGINAL_STEP_FILE.fullmatch(last.name) and (last.parent / "embeddings.pt").is_file():
        return last.parent / "embeddings.pt"
    stem = _A1111_STEP_FILE.fullmatch(last.name) or _A1111_IMAGE_FILE.fullmatch(last.name)
    if stem:
        for folder in (p, p / A1111_EMBEDDINGS):
            if (folder / f"{stem.group(1)}.pt").is_file():
                return folder / f"{stem.group(1)}.pt"
    return last


def load_snapshot_embedding(path: PathLike) -> torch.Tensor:
    """The learned embedding in a saved file (any format ``embedding_files.read_embedding_file`` reads, by content)
    as float32 on the CPU: [D] for one vector, [n, D] for several."""
    try:
        v = read_embedding_file(path).rows.float()
    except EmbeddingFileError as err:
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(str(err)) from None
        raise
    return v[0] if v.shape[0] == 1 else v


def run_token(f: EmbeddingFile) -> str:
    """The token a run's embedding file stands for: its stored token, except for an A1111 snapshot
    ``<name>-<step>.pt``, which A1111 saves under the name "<name>-<step>": there the run's ``<name>``."""
    m = _A1111_STEP_FILE.fullmatch(f.path.name) or _A1111_IMAGE_FILE.fullmatch(f.path.name)
    if f.format.startswith("a1111") and m and f.token in (f.path.stem, m.group(1)):
        return m.group(1)
    return f.token


def load_textual_inversion_run(pipe: Pipeline, path: PathLike, token: str | None = None) -> list[str]:
    """Load a run's final embedding (``final_embedding``; any format, by content) into pipe with
    ``pipe.load_textual_inversion``, under `token` (default: the stored one); returns the tokens added (token,
    token_1, ...), for ``pipe.unload_textual_inversion``. An embedding of another width is refused first. A file of
    one part per encoder (SDXL's clip_l + clip_g) into a pipeline of those encoders: each part into its encoder
    (``unload_textual_inversion(tokens, tokenizer=, text_encoder=)`` per encoder undoes it)."""
    f = read_embedding_file(final_embedding(path))
    f = read_embedding_file(f.path, token or run_token(f))
    stack = text_stack(pipe)
    if f.per_encoder and len(stack) > 1:
        check_stack_fits(f, stack)
        for e in stack:
            load_learned_token(pipe, f.parts[e.name].to(e.rows.dtype), token=f.row_names, text=e)
        return f.row_names
    text = stack.primary
    check_fits(f, text.encoder)
    weight = text.rows
    load_learned_token(pipe, {f.token: f.rows.to(weight.dtype)}, token=f.token)
    return f.row_names


def check_stack_fits(f: EmbeddingFile, stack: Any) -> None:
    """EmbeddingFileError unless a per-encoder file holds a part for each encoder of the stack, of its width."""
    names = [e.name for e in stack]
    if sorted(f.parts) != sorted(names):
        raise EmbeddingFileError(f"{f.path.name} holds the parts {sorted(f.parts)} and the model's text encoders are "
                                 f"{names}; pass the model the embedding was trained on")
    for e in stack:
        width = int(f.parts[e.name].shape[-1])
        if width != e.width:
            raise EmbeddingFileError(f"{f.path.name}: its {e.name} part is {width} wide but the model's {e.name} is "
                                     f"{e.width}: the embedding was trained on another model; pass that model")


# ----------------------------------------------------------------------------- inputs


def _prompt_tables(tok: Any, config: TextualInversionConfig, first_id: int, init_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per template [T, L]: token ids (placeholder positions read the initializer), placeholder mask, row index,
    and the ids with the placeholder's own (what a pipeline feeds; SDXL's pooled output reads a position of them)."""
    prompts = [t.replace("{}", " ".join(config.tokens)) for t in config.templates]
    ids = token_ids(tok, prompts)
    is_ph, sel = placeholder_positions(ids, range(first_id, first_id + config.num_vectors))
    for t, n in zip(config.templates, is_ph.sum(1).tolist()):
        if n != config.num_vectors:
            raise ValueError(f"template {t!r} holds {n} of the {config.num_vectors} placeholder tokens after "
                             f"tokenization (cut at {tok.model_max_length} tokens, or the placeholder is in the text)")
    return torch.where(is_ph, init_id, ids).to(device), is_ph.to(device), sel.to(device), ids.to(device)


# ----------------------------------------------------------------------------- training


def train_textual_inversion(
    pipe: Pipeline,
    images: Any,
    config: TextualInversionConfig,
    out_dir: PathLike,
    progress: bool = True,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    load_result: bool = True,
) -> TextualInversionResult:
    """Learn the placeholder's embedding from reference images; resumes the run already in out_dir, if any.

    Args:
        pipe: a StableDiffusionPipeline (any device and dtype; the row trains in float32). Not modified during
            training; at the end the final embedding is loaded into it (``pipe.load_textual_inversion``).
        images: PIL images or uint8 arrays [H, W, 3] of one size, or a uint8 array [N, H, W, 3]; centre-cropped
            to a square and resized (bicubic) to the training resolution.
        config: TextualInversionConfig. Resuming requires the same config, images and pipeline; only steps may differ, so a
            finished run is extended by a call with a larger steps.
        out_dir: folder of the run (created); see the module docstring for its files.
        progress: show a tqdm progress bar.
        callback: called after each step as callback(step, loss, embedding float32 [n, D] on the CPU); an
            exception raised there stops training, and the next call resumes from the last saved step.
        load_result: load the final embedding into pipe (False: leave pipe as it was).
    """
    check_call(pipe, config, TextualInversionConfig)
    family = family_of(pipe)
    stack = family.text_stack(pipe)  # one encoder (SD 1.x) or several (SDXL: clip_l, clip_g): a row in each
    encoders = [e.encoder for e in stack]
    unet, vae = pipe.unet, pipe.vae
    ph = config.placeholder
    toks, init_ids, first_ids = [], [], []
    for e in stack:
        check_new_token(e.tokenizer, ph, "placeholder",
                        f"remove it with pipe.unload_textual_inversion({ph!r}) or use a fresh pipeline")
        init_ids.append(class_word_id(e.tokenizer, config.initializer))
        tok = copy.deepcopy(e.tokenizer)
        if tok.add_tokens(config.tokens) != config.num_vectors:
            raise ValueError(f"the tokenizer already holds one of {config.tokens}; pick another placeholder")
        ph_ids = tok.convert_tokens_to_ids(config.tokens)
        if ph_ids != list(range(ph_ids[0], ph_ids[0] + config.num_vectors)):
            raise ValueError(f"the placeholder tokens got non-consecutive ids {ph_ids}")
        toks.append(tok)
        first_ids.append(ph_ids[0])

    device, res, pixels = training_images(pipe, images, config)
    Ws = [e.rows for e in stack]
    record = {"format": _FORMAT, **asdict(config), "templates": list(config.templates),
              "resolution_used": res, "num_images": len(pixels), "images_sha256": sha256(pixels),
              "embedding_shape": list(Ws[0].shape), "dtype": f"{encoders[0].dtype}/{unet.dtype}",
              "initializer_row_sha256": tensors_sha256(Ws[0][init_ids[0]])}
    if len(stack) > 1:  # every encoder's matrix and initializer row (SD 1.x runs keep their record as it was)
        record["encoders"] = {e.name: {"embedding_shape": list(W.shape), "dtype": str(e.encoder.dtype),
                                       "initializer_row_sha256": tensors_sha256(W[i])}
                              for e, W, i in zip(stack, Ws, init_ids)}
    tables = [_prompt_tables(tok, config, f, i, device) for tok, f, i in zip(toks, first_ids, init_ids)]
    out, state, history, start = start_run(out_dir, record, owned_by(_STEP_FILE, FINAL_FILE), "learned embeddings",
                                           "the embeddings of earlier steps: list_snapshots(out_dir)")

    keys = ["rows"] + [f"rows_{e.name}" for e in list(stack)[1:]]  # resume state: SD 1.x's key kept
    rows = [(state[k].to(device) if state is not None else W[i].detach().float().to(device).repeat(
        config.num_vectors, 1)).clone().requires_grad_(True) for k, W, i in zip(keys, Ws, init_ids)]
    fp16 = torch.float16 in (*(e.dtype for e in encoders), unet.dtype)
    opt, scaler = adamw(rows, config, device, fp16, state)
    side = square_side(images)

    def save_state(step: int) -> None:
        save_resume_state(out / RESUME_FILE, step, {k: r.detach().cpu().clone() for k, r in zip(keys, rows)}, opt,
                          scaler, history)

    def learned() -> dict[str, torch.Tensor]:
        """One encoder: {placeholder: rows} (diffusers' file); several: {encoder name: rows} (clip_l + clip_g)."""
        if len(stack) == 1:
            return {ph: rows[0].detach().float().cpu().clone()}
        return {e.name: r.detach().float().cpu().clone() for e, r in zip(stack, rows)}

    def save(path: Path) -> Path:
        if len(stack) == 1:
            return save_learned_embeds(learned(), path)
        return save_encoder_embeds(learned(), path, ph)

    def after(k: int, loss: float) -> None:
        if callback is not None:
            callback(k, loss, rows[0].detach().float().cpu().clone())

    if start < config.steps:
        noising = Noising(pipe)
        n_img = len(pixels)
        hooks = [PlaceholderRows(r) for r in rows]
        # read once: diffusers' ModelMixin.dtype walks every submodule (about 1 ms a call on the micro-SD's step of
        # 25 ms); the pipeline does not change during training
        unet_dtype = unet.dtype

        def step(s: int, mean: torch.Tensor, std: torch.Tensor) -> float:
            rng, g = step_rng(config.seed, s)
            i = torch.from_numpy(draw_images(rng, n_img, config.batch_size, config.flip_p)).to(device)
            tmpl = torch.from_numpy(rng.integers(len(config.templates), size=config.batch_size)).to(device)
            zt, t, target = noising(mean[i], std[i], g, device)
            for hook, (_, mask_table, sel_table, _) in zip(hooks, tables):
                hook.mask, hook.sel = mask_table[tmpl], sel_table[tmpl]
            cond, added = family.unet_condition(stack, [tb[0][tmpl] for tb in tables], [tb[3][tmpl] for tb in tables],
                                                (side, side), res)
            added = None if added is None else {k: v.to(unet_dtype) for k, v in added.items()}
            pred = unet(zt.to(unet_dtype), t, cond.to(unet_dtype), added_cond_kwargs=added).sample
            loss = F.mse_loss(pred.float(), target)
            optimizer_step(loss, opt, scaler, rows, None)
            return float(loss.detach().cpu())

        # eval mode for the encoding too: a module in train mode computes slightly different numbers
        with contextlib.ExitStack() as hooked:
            for hook, enc in zip(hooks, encoders):
                hooked.enter_context(hook.hooked(enc))
            hooked.enter_context(frozen([*encoders, unet, vae]))
            mean, std = latent_stats(vae, pixels, config.flip_p > 0, device)
            with torch.enable_grad():
                run_steps(start=start, steps=config.steps, save_every=config.save_every,
                          step=lambda s: step(s, mean, std), history=history,
                          snapshot=lambda k: save(out / f"learned_embeds-steps-{k}.safetensors"),
                          save_state=save_state, after=after, desc=f"textual inversion {ph}", progress=progress)

    final = save(out / FINAL_FILE)
    if load_result and len(stack) == 1:
        load_learned_token(pipe, str(final), token=ph)
    elif load_result:
        load_textual_inversion_run(pipe, out, token=ph)
    return TextualInversionResult(out_dir=out, steps=config.steps, loss_history=history,
                    snapshot_paths=[p for _, p in list_snapshots(out)], final_path=final)
