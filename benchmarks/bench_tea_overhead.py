"""Generation time with and without the TEA context manager (persviz.tea.pipeline.tea) on one pipeline.

Loads the pipeline with persviz.loading.load_pipeline (default: the ShapesWorld micro-SD), adds a learned-looking
placeholder (the class word's row, rescaled and perturbed, seeded), then alternates plain and TEA generations of
the same prompt and seed. Prints the median time of each, their ratio (the overhead of TEA), the time of one
enter + exit of the context manager alone, and two sanity checks: TEA changed the image, and the image after
leaving the context equals the one before (rows restored).

    python benchmarks/bench_tea_overhead.py                 # ShapesWorld, 25 steps, 4 images, 10 repeats
    python benchmarks/bench_tea_overhead.py --small         # 2 steps, 1 image, 2 repeats
    python benchmarks/bench_tea_overhead.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --class-word dog --prompt "a photo of a {} on a beach" --device cuda
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from common import add_model_args, parse_args, parser, sync

from persviz.embeddings import class_word_id
from persviz.loading import load_pipeline
from persviz.prompts import load_prompt_set
from persviz.tea.pipeline import tea

PLACEHOLDER = "<tea-bench>"



def main() -> None:
    ap = parser(__doc__, "2 steps, 1 image, 2 repeats")
    add_model_args(ap)
    ap.add_argument("--class-word", default="square", help="one-token class word c (default 'square')")
    ap.add_argument("--prompt", default=None,
                    help="prompt with '{}' for the placeholder (default: the first ShapesWorld contextual prompt)")
    ap.add_argument("--steps", type=int, default=None, help="inference steps (default 25; --small 2)")
    ap.add_argument("--images", type=int, default=None, help="images per prompt (default 4; --small 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 10; --small 2)")
    ap.add_argument("--rotation", type=float, default=None, help="TEA rotation (default: the paper's TI value)")
    ap.add_argument("--scale", type=float, default=None, help="TEA scale (default: the paper's TI value)")
    args = parse_args(ap)
    steps = args.steps or (2 if args.small else 25)
    n_img = args.images or (1 if args.small else 4)
    repeats = args.repeats or (2 if args.small else 10)

    pipe = load_pipeline(args.model, device=args.device)
    device = pipe.device
    W = pipe.text_encoder.get_input_embeddings().weight
    c = W[class_word_id(pipe.tokenizer, args.class_word)].detach().float().cpu()
    g = torch.Generator().manual_seed(args.seed)
    v = 3.0 * c + 2.0 * c.norm() * torch.randn(c.shape, generator=g) / c.numel() ** 0.5  # drifted: larger, rotated
    pipe.load_textual_inversion({PLACEHOLDER: v}, token=PLACEHOLDER)
    template = args.prompt or load_prompt_set("shapesworld_contextual")[0]
    prompt = template.replace("{}", PLACEHOLDER)
    print(f"model {args.model} on {device} ({pipe.unet.dtype}), torch threads {torch.get_num_threads()}; "
          f"prompt {prompt!r}, {steps} steps, {n_img} image(s), {repeats} repeats")

    def generate() -> tuple[np.ndarray, float]:
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        sync(device)
        t0 = time.perf_counter()
        out = pipe(prompt, num_inference_steps=steps, num_images_per_prompt=n_img, generator=gen,
                   output_type="np").images
        sync(device)
        return out, time.perf_counter() - t0

    def generate_tea() -> tuple[np.ndarray, float]:
        sync(device)
        t0 = time.perf_counter()
        with tea(pipe, PLACEHOLDER, args.class_word, args.rotation, args.scale):
            gen = torch.Generator(device="cpu").manual_seed(args.seed)
            out = pipe(prompt, num_inference_steps=steps, num_images_per_prompt=n_img, generator=gen,
                       output_type="np").images
        sync(device)
        return out, time.perf_counter() - t0

    first, _ = generate()  # warm-up of both paths
    generate_tea()
    plain_t, tea_t = [], []
    for _ in range(repeats):  # alternate, so drifts in machine load hit both alike
        img_plain, t = generate()
        plain_t.append(t)
        img_tea, t = generate_tea()
        tea_t.append(t)
    after, _ = generate()

    n_cm = 200
    t0 = time.perf_counter()
    for _ in range(n_cm):
        with tea(pipe, PLACEHOLDER, args.class_word, args.rotation, args.scale):
            pass
    sync(device)
    t_cm = (time.perf_counter() - t0) / n_cm

    mp, mt = statistics.median(plain_t), statistics.median(tea_t)
    print(f"\nplain generation   median {mp:.4f} s  (min {min(plain_t):.4f}, max {max(plain_t):.4f})")
    print(f"with tea(...)      median {mt:.4f} s  (min {min(tea_t):.4f}, max {max(tea_t):.4f})")
    print(f"ratio tea / plain  {mt / mp:.3f}  (overhead {100 * (mt / mp - 1):+.1f} %)")
    print(f"enter + exit of tea(...) alone: {1e3 * t_cm:.3f} ms ({100 * t_cm / mp:.3f} % of one plain generation)")
    print(f"TEA changed the image: {not np.array_equal(img_tea, img_plain)} "
          f"(max |diff| {np.abs(img_tea - img_plain).max():.3f}); "
          f"image after the context equals the one before: {np.array_equal(after, first)}")


if __name__ == "__main__":
    main()
