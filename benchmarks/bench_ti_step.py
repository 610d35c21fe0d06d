"""Textual Inversion step: persviz's trainer vs a port of the diffusers example's loop, same model and batches.

persviz.trainers.train_textual_inversion optimises only the placeholder row (a forward hook writes it into
the text encoder's input embedding) and encodes the reference images with the VAE once; the diffusers
example (benchmarks/diffusers_ti_port.py) trains the whole resized embedding matrix, restores every other
row after each step (index_no_updates) and encodes the images every step. Both runs start from the same
pipeline and read the same per-step draws (persviz.shapesworld.train.step_rng), so they must trace the same
loss curve. Prints the median time per step of each (the first step left out), their ratio, the whole-call
times, and the largest differences between the loss curves and the final embeddings.

The example calls text_encoder.train() and persviz trains with the text encoder in eval mode; with CLIP's
dropout at 0 the two modes compute the same function (up to kernel-level rounding), see the printed
differences.

Models: --model shapesworld (the micro-SD, default), sd15-random (SD 1.5's real architecture, 1.07 B parameters,
random weights seeded by --seed, built offline by persviz.sd15.build_sd15_pipeline; default 128 px), sdxl-small
(SDXL base's architecture at reduced width, random weights: clip_l 32 wide, clip_g 48, UNet 32-64-64, as the offline
tests write it with persviz.families.sdxl.write_sdxl_repo; default 64 px), a Hub id or a local pipeline folder. An
SDXL pipeline (two text encoders) runs persviz's trainer, which learns a row per encoder, against the port of
diffusers' textual_inversion_sdxl.py loop (benchmarks/diffusers_ti_sdxl_port.py), and compares both rows. --profile adds a table of where the time of a step goes (per-phase timer, both loops).

    python benchmarks/bench_ti_step.py               # ShapesWorld micro-SD, 50 steps
    python benchmarks/bench_ti_step.py --repeats 5 --profile --profile-steps 20
    python benchmarks/bench_ti_step.py --small       # 3 steps
    python benchmarks/bench_ti_step.py --model sd15-random --steps 20 --profile          # CPU, 128 px
    python benchmarks/bench_ti_step.py --model sd15-random --resolution 512 --dtype float16 --device cuda --profile
    python benchmarks/bench_ti_step.py --model sdxl-small --steps 50 --threads 1 --repeats 3 --profile
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_args, parse_args, parser  # noqa: E402
from diffusers_ti_port import train_like_diffusers_example  # noqa: E402
from diffusers_ti_sdxl_port import train_like_diffusers_sdxl_example  # noqa: E402

from persviz.loading import load_pipeline  # noqa: E402
from persviz.shapesworld import Obj, Scene, render_batch  # noqa: E402
from persviz.trainers import OBJECT_TEMPLATES, TextualInversionConfig, load_snapshot_embedding, train_textual_inversion  # noqa: E402

PLACEHOLDER = "<ti-bench>"
SD15_RANDOM = "sd15-random"
SDXL_SMALL = "sdxl-small"
_KEEP: list[Any] = []  # the temporary folder of sdxl-small, kept for the process's life
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PhaseTimer:
    """Wall-clock seconds per phase of each training step, from hooks that both loops pass through.

    Forward pre/post hooks on the text encoder, the UNet and the VAE's encoder; torch.Tensor.backward wrapped;
    the global optimizer-step hooks; plus any phase(name) block (the port's batch preparation and row restore).
    step_done() closes a step; "other" is the rest of the step (host work: draws, noising, loss, zero_grad,
    bookkeeping). On CUDA each boundary synchronizes, so the profiled run is slower than the timed one."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.order: list[str] = []
        self.handles: list[Any] = []
        self.t_step = 0.0
        self._open: dict[str, float] = {}

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _add(self, name: str, dt: float) -> None:
        if name not in self.order:
            self.order.append(name)
        self.cur[name] += dt

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = self.now()
        try:
            yield
        finally:
            self._add(name, self.now() - t0)

    def modules(self, **named: torch.nn.Module) -> None:
        for name, m in named.items():
            label = f"{name} fwd"

            def pre(mod, args, label=label):
                self._open[label] = self.now()

            def post(mod, args, out, label=label):
                self._add(label, self.now() - self._open.pop(label))

            self.handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def start(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def opt_pre(opt, args, kwargs):
            self._open["optimizer step"] = self.now()

        def opt_post(opt, args, kwargs):
            self._add("optimizer step", self.now() - self._open.pop("optimizer step"))

        self.handles += [register_optimizer_step_pre_hook(opt_pre), register_optimizer_step_post_hook(opt_post)]
        self._backward = torch.Tensor.backward
        timer = self

        def backward(tensor, *args, **kwargs):
            with timer.phase("backward"):
                return timer._backward(tensor, *args, **kwargs)

        torch.Tensor.backward = backward
        self.t_step = self.now()

    def step_done(self, *_args: Any) -> None:
        t = self.now()
        row = dict(self.cur)
        row["step"] = t - self.t_step
        self.steps.append(row)
        self.cur = defaultdict(float)
        self.t_step = t

    def stop(self) -> None:
        torch.Tensor.backward = self._backward
        for h in self.handles:
            h.remove()
        self.handles = []

    def table(self, skip_first: int = 1) -> dict[str, float]:
        """Median seconds per phase over the steps after the first `skip_first` (setup, warm-up)."""
        rows = self.steps[skip_first:] or self.steps
        out = {}
        for name in self.order:
            out[name] = statistics.median(r.get(name, 0.0) for r in rows)
        out["other (host work)"] = statistics.median(r["step"] - sum(r.get(n, 0.0) for n in self.order) for r in rows)
        out["step"] = statistics.median(r["step"] for r in rows)
        return out


def build_pipeline(args: Any) -> tuple[Any, torch.device]:
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model == SD15_RANDOM:
        from persviz.sd15 import build_sd15_pipeline
        side = args.resolution or 128
        pipe = build_sd15_pipeline(random_weights=True, sample_size=side if side % 64 == 0 else None, dtype=dtype,
                                   device=device, seed=args.seed)
    elif args.model == SDXL_SMALL:
        from persviz.families.sdxl import write_sdxl_repo
        tmp = tempfile.TemporaryDirectory()
        _KEEP.append(tmp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            write_sdxl_repo(Path(tmp.name) / "sdxl", small=True)
        pipe = load_pipeline(str(Path(tmp.name) / "sdxl"), device=str(device), dtype=dtype)
    else:
        pipe = load_pipeline(args.model, device=str(device), dtype=dtype)
    return pipe, device


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def text_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    return {"text_encoder": pipe.text_encoder, **({"text_encoder_2": pipe.text_encoder_2} if is_sdxl(pipe) else {})}


def run_persviz(pipe: Any, images: np.ndarray, cfg: TextualInversionConfig, timer: PhaseTimer | None = None
                ) -> dict[str, Any]:
    stamps: list[float] = []

    def tick(step: int, loss: float, emb: torch.Tensor) -> None:
        stamps.append(time.perf_counter())
        if timer is not None:
            timer.step_done()

    with tempfile.TemporaryDirectory() as tmp:
        if timer is not None:
            timer.modules(**text_modules(pipe), unet=pipe.unet, vae_encoder=pipe.vae.encoder)
            timer.start()
        try:
            t0 = time.perf_counter()
            stamps.append(t0)
            res = train_textual_inversion(pipe, images, cfg, Path(tmp) / "run", progress=False, load_result=False,
                                          callback=tick)
            total = time.perf_counter() - t0
        finally:
            if timer is not None:
                timer.stop()
        if is_sdxl(pipe):  # a row per encoder: {"clip_l": [1, D_l], "clip_g": [1, D_g]}
            from safetensors.torch import load_file
            rows = {k: v.float() for k, v in load_file(str(res.final_path)).items()}
        else:
            rows = load_snapshot_embedding(res.final_path).reshape(1, -1)
    # step 1 also holds the setup (VAE encoding of the images)
    return {"losses": np.asarray(res.loss_history), "seconds": np.diff(stamps), "rows": rows, "total": total}


def run_port(pipe: Any, images: np.ndarray, cfg: TextualInversionConfig, timer: PhaseTimer | None = None
             ) -> dict[str, Any]:
    hooks: dict[str, Any] = {}
    if timer is not None:
        hooks = dict(on_models=lambda vae, unet, **texts: timer.modules(
            **texts, unet=unet, vae_encoder=vae.encoder), phase=timer.phase, callback=timer.step_done)
        timer.start()
    try:
        t0 = time.perf_counter()
        if is_sdxl(pipe):
            port = train_like_diffusers_sdxl_example(
                pipe, images, PLACEHOLDER, cfg.initializer, cfg.templates, cfg.steps, learning_rate=cfg.lr,
                train_batch_size=cfg.batch_size, resolution=cfg.resolution, flip_p=cfg.flip_p, seed=cfg.seed,
                adam_weight_decay=cfg.weight_decay, **hooks)
        else:
            port = train_like_diffusers_example(pipe, images, PLACEHOLDER, cfg.initializer, cfg.templates, cfg.steps,
                                                learning_rate=cfg.lr, train_batch_size=cfg.batch_size,
                                                resolution=cfg.resolution, flip_p=cfg.flip_p, seed=cfg.seed, **hooks)
        port["total"] = time.perf_counter() - t0
    finally:
        if timer is not None:
            timer.stop()
    port["losses"] = np.asarray(port["losses"])
    port["seconds"] = np.asarray(port["seconds"])
    return port


def print_profile(ours: dict[str, float], port: dict[str, float], steps: int) -> None:
    names = [n for n in ("text_encoder fwd", "unet fwd", "backward", "optimizer step", "vae_encoder fwd",
                         "batch (PIL, tokenizer)", "restore rows (index_no_updates)", "other (host work)")
             if n in ours or n in port]
    names += [n for n in dict.fromkeys([*ours, *port]) if n not in names and n != "step"]
    print(f"\nwhere a step goes (median ms over profiled steps 2..{steps}; phase timer, see PhaseTimer):")
    print(f"{'phase':34s} {'persviz ms':>11s} {'%':>6s} {'port ms':>11s} {'%':>6s} {'port - persviz':>15s}")
    for n in names + ["step"]:
        a, b = ours.get(n, 0.0), port.get(n, 0.0)
        print(f"{n:34s} {1e3 * a:11.2f} {100 * a / ours['step']:6.1f} {1e3 * b:11.2f} {100 * b / port['step']:6.1f} "
              f"{1e3 * (b - a):15.2f}")


def main() -> None:
    ap = parser(__doc__, "3 steps")
    add_model_args(ap, "default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="the pipeline's dtype (default float32; the row trains in float32 either way)")
    ap.add_argument("--initializer", default="square", help="one-token class word (default 'square')")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each run (default 50; --small 3)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--flip-p", type=float, default=0.5)
    ap.add_argument("--resolution", type=int, default=None,
                    help=f"default: the pipeline's native size ({SD15_RANDOM}: 128)")
    ap.add_argument("--profile", action="store_true", help="also run --profile-steps steps of each loop under the "
                    "phase timer and print where the time goes")
    ap.add_argument("--profile-steps", type=int, default=6, help="steps of each profiled run (default 6)")
    ap.add_argument("--repeats", type=int, default=1, help="timed pairs of runs, alternated; the lowest median of "
                    "each side is reported (default 1)")
    ap.add_argument("--no-timing", action="store_true", help="with --profile: only the profiled runs")
    args = parse_args(ap)
    steps = args.steps or (3 if args.small else 50)
    if args.model == SD15_RANDOM and args.resolution is None:
        args.resolution = 128
    if args.model == SDXL_SMALL and args.resolution is None:
        args.resolution = 64

    pipe, device = build_pipeline(args)
    obj = Obj("square", "red", "striped", "large")  # four renders of one ShapesWorld concept
    images = render_batch([Scene(obj, bg) for bg in ("gray", "white", "navy", "beige")], seed=0)
    if args.resolution and images.shape[1] != args.resolution:  # the images at the training side: no resizing on
        from PIL import Image                                     # either side (persviz crops and resizes once)
        images = np.stack([np.asarray(Image.fromarray(im).resize((args.resolution, args.resolution),
                                                                  Image.Resampling.BICUBIC)) for im in images])

    def config(n: int) -> TextualInversionConfig:
        return TextualInversionConfig(placeholder=PLACEHOLDER, initializer=args.initializer, steps=n, lr=args.lr,
                                      batch_size=args.batch_size, save_every=n + 1, seed=args.seed,
                                      templates=OBJECT_TEMPLATES, resolution=args.resolution, flip_p=args.flip_p)

    n_params = sum(p.numel() for m in (pipe.unet, pipe.vae, *text_modules(pipe).values()) for p in m.parameters())
    print(f"model {args.model} ({n_params / 1e6:.1f} M parameters, {pipe.unet.dtype}) on {device}, torch threads "
          f"{torch.get_num_threads()}; {steps} steps, batch {args.batch_size}, {len(images)} images at "
          f"{args.resolution or 'native'} px, vocabulary {len(pipe.tokenizer)} rows x "
          f"{pipe.text_encoder.get_input_embeddings().weight.shape[1]}")

    if not (args.profile and args.no_timing):
        cfg = config(steps)

        def med(x: np.ndarray) -> float:
            return float(statistics.median(x[1:] if len(x) > 1 else x))

        meds: dict[str, list[float]] = {"persviz": [], "port": []}
        for _ in range(max(1, args.repeats)):  # alternated, so that a burst of load on the machine hits both
            ours = run_persviz(pipe, images, cfg)
            port = run_port(pipe, images, cfg)
            meds["persviz"].append(med(ours["seconds"]))
            meds["port"].append(med(port["seconds"]))
        mo, mp = min(meds["persviz"]), min(meds["port"])
        of = f" (the lowest of {args.repeats} alternated runs each)" if args.repeats > 1 else ""
        print(f"\nper step (median, step 1 left out){of}: persviz {1e3 * mo:.2f} ms, diffusers-example port "
              f"{1e3 * mp:.2f} ms; ratio persviz / port {mo / mp:.3f} (port / persviz {mp / mo:.2f}x)")
        if args.repeats > 1:
            print("  medians of the runs (ms): persviz " + " ".join(f"{1e3 * x:.2f}" for x in meds["persviz"])
                  + "; port " + " ".join(f"{1e3 * x:.2f}" for x in meds["port"]))
        print(f"whole call: persviz {ours['total']:.2f} s, port {port['total']:.2f} s (setup included; persviz also "
              f"writes config.json, resume_state.pt and the final embedding)")
        diff = np.abs(ours["losses"] - port["losses"])
        if isinstance(ours["rows"], dict):  # SDXL: each encoder's row
            rows_diff = ", ".join(f"{k} {(ours['rows'][k] - port['rows'][k]).abs().max().item():.3e}"
                                  for k in sorted(port["rows"]))
        else:
            rows_diff = f"{(ours['rows'] - port['rows']).abs().max().item():.3e}"
        print(f"loss curves: max |diff| {diff.max():.3e} (max relative {(diff / np.abs(port['losses'])).max():.3e}) "
              f"over {steps} steps; final embedding max |diff| {rows_diff}")
        if steps <= 10:
            print("persviz loss:", " ".join(f"{x:.6f}" for x in ours["losses"]))
            print("port loss:   ", " ".join(f"{x:.6f}" for x in port["losses"]))

    if args.profile:
        n = max(2, args.profile_steps)
        t_ours, t_port = PhaseTimer(device), PhaseTimer(device)
        run_persviz(pipe, images, config(n), t_ours)
        run_port(pipe, images, config(n), t_port)
        print_profile(t_ours.table(), t_port.table(), n)


if __name__ == "__main__":
    main()
