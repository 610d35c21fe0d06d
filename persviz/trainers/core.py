"""Pieces shared by the personalization trainers (textual inversion, DreamBooth-LoRA, Custom Diffusion).

All three follow the same conventions: a frozen dataclass config; an ``out_dir`` holding ``config.json`` (the config
and a fingerprint of the images and the pipeline, compared on resume), snapshots every ``save_every`` steps and
``resume_state.pt``; the randomness of step s drawn from ``step_rng(seed, s)`` only, so that a resumed run equals an
uninterrupted one bit for bit; the pipeline's weights, flags and modes restored on exit.

The config validators live in ``persviz.trainers.config_checks``, the prior-preservation images in
``persviz.trainers.class_images``. Shared beyond them: ``run_steps``, the one resumable training loop (also of the
LoRA fine-tune, Pigeon's two stages and the ShapesWorld stages), and ``TrainResult``, the one result of a training
call. ``PlaceholderRows``, the one way persviz makes a placeholder token mean a vector, lives with the text encoders
in ``persviz.text_stack``.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from persviz.families.base import Pipeline
from persviz.images import to_rgb
from persviz.errors import DamagedFileError, TrainingInterrupted
from persviz.io import PathLike, atomic_save, load_state, make_dir, write_json

CONFIG_FILE = "config.json"
RESUME_FILE = "resume_state.pt"
CLASS_DIR = "class_images"
CLASS_MANIFEST = "manifest.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the snapshot folders of DreamBooth-LoRA and Custom Diffusion

# A stream index no training step reaches: one-off draws (adapter initialisation) use step_rng(seed, INIT_STREAM).
INIT_STREAM = 2 ** 40


# ----------------------------------------------------------------------------- files


def short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_out_dir(out_dir: Path, record: dict, owned: Callable[[str], bool], what: str,
                  hint: str) -> dict | None:
    """The saved resume state if out_dir holds this run (only `steps` may differ); errors for another run.

    Args:
        owned: tells the names of files a run writes (to refuse a folder holding them without config.json).
        what: what those files are, for the message ("learned embeddings").
        hint: where the results of earlier steps are, for the message ("list_snapshots(out_dir)").
    """
    cfg = out_dir / CONFIG_FILE
    if not cfg.is_file():
        stray = [p.name for p in out_dir.iterdir() if owned(p.name)] if out_dir.is_dir() else []
        if stray:
            raise ValueError(f"{out_dir} holds {what} ({sorted(stray)[:3]}) but no {CONFIG_FILE}; use a new out_dir")
        return None
    try:
        old = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict):
        raise DamagedFileError(f"{cfg} is not a persviz run record (not a JSON object); move the folder away or use a "
                               "new out_dir")
    diff = sorted(k for k in set(old) | set(record) if k != "steps" and old.get(k) != record.get(k))
    if diff:
        lines = "; ".join(f"{k}: {short(old.get(k))} there, {short(record.get(k))} now" for k in diff)
        raise ValueError(f"{out_dir} holds a run with a different setup ({lines}). Resume it with the same "
                         f"config, images and pipeline (only steps may differ, to extend it), or use a new out_dir")
    state_path = out_dir / RESUME_FILE
    if not state_path.is_file():
        return None
    state = load_state(state_path, f"move it away (or delete it) and run the same command again: the run restarts "
                                   f"from step 0 in {out_dir}")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedFileError(f"{state_path} is not a persviz resume state (no step in it); move it away and run "
                               "the same command again")
    if state["step"] > record["steps"]:
        raise ValueError(f"{out_dir} holds a run already at step {state['step']} > steps={record['steps']}; pass "
                         f"steps >= {state['step']} ({hint})")
    return state


def owned_by(pattern: re.Pattern, *names: str) -> Callable[[str], bool]:
    """Tells the names of files a run writes: resume_state.pt, the names given and those matching the pattern."""
    return lambda name: name in (RESUME_FILE, *names) or bool(pattern.fullmatch(name))


def start_run(out_dir: PathLike, record: dict, owned: Callable[[str], bool], what: str,
              hint: str, final: str | tuple[str, ...] | None = None) -> tuple[Path, dict | None, list[float], int]:
    """Creates out_dir, checks that it holds this run or none (check_out_dir) and writes config.json.

    final: the run's final weights file(s); a folder holding this run's config.json and them but no
    resume_state.pt (a finished run shipped without it, as persviz's ShapesWorld runs) is finished: the step to
    start at is `steps`, so nothing is retrained; asking it for more steps is an error (it cannot resume).
    Returns (out_dir as a Path, the saved resume state or None, the loss history so far, the step to start at).
    """
    out = make_dir(Path(out_dir).expanduser())
    had_config = (out / CONFIG_FILE).is_file()
    old_steps = json.loads((out / CONFIG_FILE).read_text()).get("steps") if had_config else None
    state = check_out_dir(out, record, owned, what, hint)
    finals = (final,) if isinstance(final, str) else tuple(final or ())
    if state is None and had_config and finals and all((out / f).is_file() for f in finals):
        if old_steps != record["steps"]:
            raise ValueError(f"{out} holds a finished run of {old_steps} steps without {RESUME_FILE}, so it cannot "
                             f"be extended to {record['steps']}; ask for steps={old_steps} or use a new out_dir")
        return out, None, [], int(record["steps"])
    write_json(out / CONFIG_FILE, record)
    if state is None:
        return out, None, [], 0
    return out, state, [float(x) for x in state["loss_history"]], int(state["step"])


def save_resume_state(path: Path, step: int, tensors: dict[str, Any], opt: torch.optim.Optimizer, scaler: Any,
                      history: list[float]) -> None:
    """Writes resume_state.pt (atomically): the step, the trained tensors ({key: CPU copies}), the optimizer and
    scaler states and the loss history."""
    atomic_save({"step": step, **tensors, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "loss_history": list(history)}, path)


def numbered(out_dir: PathLike, pattern: re.Pattern,
             keep: Callable[[Path], bool] = lambda p: True) -> list[tuple[int, Path]]:
    """The (k, path) of every entry of out_dir whose name matches pattern (group 1: k) and that keep(), by k."""
    d = Path(out_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"no folder {d}")
    found = ((pattern.fullmatch(p.name), p) for p in d.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m and keep(p))


def checkpoints(out_dir: PathLike, file: str) -> list[tuple[int, Path]]:
    """The (step, folder) of every checkpoint-{k} folder in out_dir holding `file`, sorted by step."""
    return numbered(out_dir, CHECKPOINT, lambda p: p.is_dir() and (p / file).is_file())


def weights_path(path: PathLike, file: str, what: str, hint: str) -> Path:
    """path, or path/file if path is a folder; a FileNotFoundError "no {what} at ...; {hint}" if it is no file."""
    p = Path(path).expanduser()
    f = p / file if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no {what} at {f}; {hint}")
    return f


@dataclass
class TrainResult:
    """What a training call produced (every trainer: textual inversion, DreamBooth-LoRA, Custom Diffusion, the LoRA
    fine-tune, Pigeon); `steps` and `loss_history` count all steps of the run in out_dir (earlier calls included).

    Args:
        snapshot_paths: the run's snapshots (files or checkpoint folders), by step.
        final_path: the final weights file.
        embedding_path: Custom Diffusion: the final modifier embedding (None for the others).
        class_images_dir: DreamBooth-LoRA and Custom Diffusion: the prior-preservation images (None without).
        stats: per-step values besides the loss ({name: [value per step]}; Pigeon's loss parts).
    """

    out_dir: Path
    steps: int
    loss_history: list[float]
    snapshot_paths: list[Path]
    final_path: Path
    embedding_path: Path | None = None
    class_images_dir: Path | None = None
    stats: dict[str, list[float]] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        """loss_history (Pigeon's name for it)."""
        return self.loss_history


# ----------------------------------------------------------------------------- inputs


def check_pipe(pipe: Pipeline) -> None:
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise ValueError(f"pipe has no {part}; pass a StableDiffusionPipeline")


def check_call(pipe: Pipeline, config: Any, config_type: type) -> None:
    """A ValueError unless config is a config_type and pipe a StableDiffusionPipeline (check_pipe)."""
    if not isinstance(config, config_type):
        raise ValueError(f"config must be a {config_type.__name__}; got {type(config).__name__}")
    check_pipe(pipe)


def pipe_device(pipe: Pipeline) -> torch.device:
    return torch.device(getattr(pipe, "_execution_device", None) or pipe.device)


def prepare_images(images: Any, resolution: int) -> np.ndarray:
    """uint8 [N, R, R, 3]: each image centre-cropped to a square and resized (bicubic) to the resolution."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an image array must be uint8 [N, H, W, 3]; got shape {images.shape}")
        items: list = list(images)
    elif isinstance(images, Image.Image):
        items = [images]
    else:
        items = list(images)
    if not items:
        raise ValueError("images is empty; pass at least one reference image")
    arrays = []
    for i, im in enumerate(items):
        if isinstance(im, Image.Image):
            a = to_rgb(im)
        else:
            a = np.asarray(im)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
                raise ValueError(f"image {i} must be a PIL image or uint8 [H, W, 3]; got {a.dtype} {a.shape}")
        arrays.append(a)
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"the images have mixed sizes {sizes} (H, W); bring them to one size first")
    h, w = sizes[0]
    out = []
    for a in arrays:
        c = min(h, w)
        a = a[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
        if c != resolution:
            a = np.asarray(Image.fromarray(a).resize((resolution, resolution), Image.Resampling.BICUBIC))
        out.append(a)
    return np.ascontiguousarray(np.stack(out))


def resolution(pipe: Pipeline, requested: int | None, config_name: str) -> int:
    """The training resolution: `requested`, or the pipeline's native size (unet sample_size * vae_scale_factor)."""
    f = int(getattr(pipe, "vae_scale_factor", 8))
    if requested is not None:
        r = int(requested)
    else:
        s = pipe.unet.config.sample_size
        if not isinstance(s, int):
            raise ValueError(f"the unet's sample_size is {s!r}; pass {config_name}(resolution=...)")
        r = s * f
    if r % f:
        raise ValueError(f"resolution {r} is not a multiple of the VAE's downsampling factor {f}")
    return r


def square_side(images: Any) -> int:
    """The side of the square prepare_images cuts from the images (the smaller of H and W), before resizing: SDXL's
    original-size conditioning."""
    first = images if isinstance(images, Image.Image) else images[0]
    h, w = (first.height, first.width) if isinstance(first, Image.Image) else np.asarray(first).shape[:2]
    return int(min(h, w))


def training_images(pipe: Pipeline, images: Any, config: Any) -> tuple[torch.device, int, np.ndarray]:
    """(the pipeline's execution device, the training resolution, the images prepared at it: prepare_images)."""
    device = pipe_device(pipe)
    res = resolution(pipe, config.resolution, type(config).__name__)
    return device, res, prepare_images(images, res)


def ddpm(pipe: Pipeline):
    """The pipeline's scheduler config as a DDPMScheduler (keys DDPM does not take are dropped)."""
    from diffusers import DDPMScheduler  # heavy: diffusers

    allowed = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    sched = DDPMScheduler(**{k: v for k, v in dict(pipe.scheduler.config).items() if k in allowed})
    if sched.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {sched.config.prediction_type!r} is not supported (epsilon, v_prediction)")
    return sched


def sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def tensors_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of tensors as float32 on the CPU (a cheap fingerprint of a pipeline: a few of its weights)."""
    return sha256(*(t.detach().float().cpu().numpy() for t in tensors))


@torch.no_grad()
def latent_stats(vae: Any, pixels: np.ndarray, flip: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 mean and std [M, C, h, w] of the VAE posterior of each image (and of its mirror image if flip)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    return encode_stats(vae, x, device)


@torch.no_grad()
def encode_stats(vae: Any, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 posterior mean and std [M, C, h, w] of float images x [M, 3, H, W] in [-1, 1], encoded one by one.
    A float16 VAE whose config asks for it (``force_upcast``: SDXL's, which overflows in float16) encodes in float32,
    as diffusers' pipelines decode with it, and is put back in float16 after (exactly: float16 -> float32 -> float16
    is lossless)."""
    if getattr(vae.config, "force_upcast", False) and vae.dtype == torch.float16:
        vae.to(torch.float32)
        try:
            return encode_stats(vae, x, device)
        finally:
            vae.to(torch.float16)
    means, stds = [], []
    for i in range(len(x)):  # one at a time: the result does not depend on how many images there are
        post = vae.encode(x[i:i + 1].to(device=device, dtype=vae.dtype)).latent_dist
        means.append(post.mean.float())
        stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def placeholder_positions(input_ids: torch.Tensor, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [..., L]: where input_ids holds one of token_ids, sel [..., L]: which one, an index into token_ids; 0
    elsewhere): what a PlaceholderRows hook reads."""
    hits = input_ids[..., None] == torch.as_tensor(list(token_ids), device=input_ids.device)
    return hits.any(-1), hits.int().argmax(-1)


@contextlib.contextmanager
def frozen(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """requires_grad off and eval mode for the modules; both restored on exit."""
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        for m in modules:
            m.requires_grad_(False)
            m.eval()
        yield
    finally:
        for p, g in grads:
            p.requires_grad_(g)
        for sub, t in modes:
            sub.training = t


def grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3


def adamw(params: Sequence[torch.Tensor], config: Any, device: torch.device, fp16: bool,
          state: dict | None) -> tuple[torch.optim.AdamW, Any]:
    """The examples' optimizer (AdamW, betas 0.9/0.999, eps 1e-8, config.lr and config.weight_decay, constant lr)
    and a GradScaler (enabled for float16 modules), both loaded from the resume state if any."""
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    scaler = grad_scaler(device, fp16)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    return opt, scaler


def restore_params(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], mismatch: str) -> None:
    """Copies the saved tensors into the parameters of the same names; ValueError(mismatch) if the names differ."""
    if sorted(saved) != sorted(params):
        raise ValueError(mismatch)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device))


def token_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids [P, L] padded to the tokenizer's max length, as the diffusers examples tokenize."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def draw_images(rng: np.random.Generator, n: int, batch: int, flip_p: float) -> np.ndarray:
    """`batch` indices of n images drawn with replacement, each + n (its mirrored copy) with probability flip_p:
    rows of ``latent_stats(..., flip=flip_p > 0)``."""
    idx = rng.integers(n, size=batch)
    if flip_p > 0:
        idx = idx + n * (rng.random(batch) < flip_p)  # mirrored copies follow
    return idx


class Noising:
    """The examples' forward process: VAE latents (a posterior sample, less the VAE's shift_factor, times its
    scaling_factor) noised at uniform timesteps by the pipeline's scheduler config read as a DDPMScheduler."""

    def __init__(self, pipe: Pipeline) -> None:
        self.scheduler = ddpm(pipe)
        self.n_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.scale = float(pipe.vae.config.scaling_factor)
        self.shift = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
        self.eps_pred = self.scheduler.config.prediction_type == "epsilon"

    def __call__(self, mean: torch.Tensor, std: torch.Tensor, g: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noised latents, timesteps, float32 target: the noise or the velocity) of the posteriors (mean, std)
        [B, C, h, w]; the latent sample, the noise and the timesteps drawn from g, in that order."""
        eps_latent = torch.randn(mean.shape, generator=g).to(device)  # the posterior sample, as latent_dist.sample()
        noise = torch.randn(mean.shape, generator=g).to(device)
        t = torch.randint(0, self.n_timesteps, (len(mean),), generator=g).to(device)
        z0 = ((mean + std * eps_latent) - self.shift) * self.scale
        zt = self.scheduler.add_noise(z0, noise, t)
        target = noise if self.eps_pred else self.scheduler.get_velocity(z0, noise, t)
        return zt, t, target.float()


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: Any, params: Sequence[torch.Tensor],
                   max_grad_norm: float | None) -> None:
    """backward, gradient clipping (the examples' clip_grad_norm_, after unscaling), AdamW step, scaler update."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if max_grad_norm is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(opt)
    scaler.update()


def run_steps(*, start: int, steps: int, save_every: int, step: Callable[[int], float], history: list[float],
              snapshot: Callable[[int], None] | None, save_state: Callable[[int], None],
              after: Callable[[int, float], None] | None, desc: str, progress: bool,
              postfix: Callable[[], Mapping[str, str]] | None = None) -> None:
    """The resumable training loop of every persviz trainer (the personalization trainers, Pigeon, the ShapesWorld
    stages): step(s) for s in [start, steps), its loss appended to history; snapshot(k) every save_every steps and
    save_state(k) then and at the last step (k: the steps done); a tqdm bar with a smoothed loss (and postfix()'s
    entries); after(k, loss) once step k is done.

    Exact resume is the caller's part: step s must draw its randomness from (seed, s) only (persviz.seeding.step_rng)
    and save_state must write everything the next step reads, so that a run resumed from the state at step k goes on
    as the uninterrupted one. An exception in step or after stops the loop (the bar is closed); the last state
    written is the one to resume from. Ctrl-C becomes a TrainingInterrupted (a KeyboardInterrupt) that says at which
    step it stopped and which saved step the same command resumes from.
    """
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress)
    avg = None
    saved, done = (start or None), start
    try:
        for s in range(start, steps):
            loss = step(s)
            history.append(loss)
            k = done = s + 1
            if snapshot is not None and k % save_every == 0:
                snapshot(k)
            if k % save_every == 0 or k == steps:
                save_state(k)
                saved = k
            avg = loss if avg is None else 0.98 * avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}", **(postfix() if postfix is not None else {}))
            if after is not None:
                after(k, loss)
    except KeyboardInterrupt:
        kept = (f"the state of step {saved} is kept and the same command resumes from it" if saved else
                "no state was saved yet, so the same command starts it again")
        raise TrainingInterrupted(f"{desc} stopped after {done} of {steps} steps (Ctrl-C); {kept}", done, saved) from None
    finally:
        bar.close()
