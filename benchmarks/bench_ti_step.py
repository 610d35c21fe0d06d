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

    python benchmarks/bench_ti_step.py               # ShapesWorld micro-SD, 50 steps
    python benchmarks/bench_ti_step.py --small       # 3 steps
    python benchmarks/bench_ti_step.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda \
        --initializer dog --steps 50
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_args, parse_args, parser  # noqa: E402
from diffusers_ti_port import train_like_diffusers_example  # noqa: E402

from persviz.loading import load_pipeline  # noqa: E402
from persviz.shapesworld import Obj, Scene, render_batch  # noqa: E402
from persviz.trainers import OBJECT_TEMPLATES, TextualInversionConfig, load_snapshot_embedding, train_textual_inversion  # noqa: E402

PLACEHOLDER = "<ti-bench>"


def main() -> None:
    ap = parser(__doc__, "3 steps")
    add_model_args(ap, "default: cuda if available, else cpu (float32 either way)")
    ap.add_argument("--initializer", default="square", help="one-token class word (default 'square')")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each run (default 50; --small 3)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--flip-p", type=float, default=0.5)
    ap.add_argument("--resolution", type=int, default=None, help="default: the pipeline's native size")
    args = parse_args(ap)
    steps = args.steps or (3 if args.small else 50)

    pipe = load_pipeline(args.model, device=args.device, dtype=torch.float32)
    obj = Obj("square", "red", "striped", "large")  # four renders of one ShapesWorld concept
    images = render_batch([Scene(obj, bg) for bg in ("gray", "white", "navy", "beige")], seed=0)
    templates = OBJECT_TEMPLATES
    cfg = TextualInversionConfig(placeholder=PLACEHOLDER, initializer=args.initializer, steps=steps, lr=args.lr,
                   batch_size=args.batch_size, save_every=steps + 1, seed=args.seed, templates=templates,
                   resolution=args.resolution, flip_p=args.flip_p)
    print(f"model {args.model} on {pipe.device}, torch threads {torch.get_num_threads()}; {steps} steps, batch "
          f"{args.batch_size}, {len(images)} images, vocabulary {len(pipe.tokenizer)} rows x "
          f"{pipe.text_encoder.get_input_embeddings().weight.shape[1]}")

    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stamps.append(t0)
        res = train_textual_inversion(pipe, images, cfg, Path(tmp) / "run", progress=False, load_result=False,
                                      callback=lambda step, loss, emb: stamps.append(time.perf_counter()))
        ours_total = time.perf_counter() - t0
        ours_rows = load_snapshot_embedding(res.final_path).reshape(1, -1)
    ours_steps = np.diff(stamps)  # step 1 also holds the setup (VAE encoding of the images)
    ours_loss = np.asarray(res.loss_history)

    t0 = time.perf_counter()
    port = train_like_diffusers_example(pipe, images, PLACEHOLDER, args.initializer, templates, steps,
                                        learning_rate=args.lr, train_batch_size=args.batch_size,
                                        resolution=args.resolution, flip_p=args.flip_p, seed=args.seed)
    port_total = time.perf_counter() - t0
    port_loss = np.asarray(port["losses"])

    def med(x: np.ndarray) -> float:
        return float(statistics.median(x[1:] if len(x) > 1 else x))

    mo, mp = med(ours_steps), med(np.asarray(port["seconds"]))
    print(f"\nper step (median, step 1 left out): persviz {1e3 * mo:.2f} ms, diffusers-example port "
          f"{1e3 * mp:.2f} ms; ratio persviz / port {mo / mp:.3f} (port / persviz {mp / mo:.2f}x)")
    print(f"whole call: persviz {ours_total:.2f} s, port {port_total:.2f} s (setup included; persviz also "
          f"writes config.json, resume_state.pt and the final embedding)")
    diff = np.abs(ours_loss - port_loss)
    print(f"loss curves: max |diff| {diff.max():.3e} (max relative {(diff / np.abs(port_loss)).max():.3e}) over "
          f"{steps} steps; final embedding max |diff| {(ours_rows - port['rows']).abs().max().item():.3e}")
    if steps <= 10:
        print("persviz loss:", " ".join(f"{x:.6f}" for x in ours_loss))
        print("port loss:   ", " ".join(f"{x:.6f}" for x in port_loss))


if __name__ == "__main__":
    main()
