"""Generation time with and without the cross-attention collector (persviz.attention.attention_maps) on one pipeline.

Loads the pipeline with persviz.loading.load_pipeline (default: the ShapesWorld micro-SD; ``--model sd15-random``:
SD 1.5's real architecture, 1.07 B parameters, with random weights, persviz.sd15), then alternates plain
generations and generations inside ``attention_maps(pipe, words=...)`` (the default bounded aggregate) of the same
prompt and seed. Prints the median time of each, their ratio (the collector's overhead), the stored size of the
aggregate, and the check that the image is identical with and without the collector.

    python benchmarks/bench_attention_overhead.py           # ShapesWorld, 25 steps, 1 image, 10 repeats
    python benchmarks/bench_attention_overhead.py --small   # 2 steps, 2 repeats
    python benchmarks/bench_attention_overhead.py --model sd15-random --resolution 256 --steps 10 --repeats 3 \
        --prompt "a photo of a dog on a beach" --words dog beach --threads 2   # SD 1.5's architecture, CPU
    python benchmarks/bench_attention_overhead.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --prompt "a photo of a dog on a beach" --words dog beach --device cuda
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from common import add_model_args, parse_args, parser, sync

from persviz.attention import attention_maps
from persviz.loading import load_pipeline

SD15_RANDOM = "sd15-random"


def main() -> None:
    ap = parser(__doc__, "2 steps, 2 repeats")
    add_model_args(ap)
    ap.add_argument("--prompt", default="a red square at the left next to a blue circle on a gray background", help="the prompt")
    ap.add_argument("--words", nargs="+", default=["square", "circle", "background"], help="words to map (in the prompt)")
    ap.add_argument("--steps", type=int, default=None, help="inference steps (default 25; --small 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 10; --small 2)")
    ap.add_argument("--resolution", type=int, default=None, help="image side for sd15-random (default 256)")
    args = parse_args(ap)
    steps = args.steps or (2 if args.small else 25)
    repeats = args.repeats or (2 if args.small else 10)

    if args.model == SD15_RANDOM:
        from persviz.sd15 import build_sd15_pipeline
        pipe = build_sd15_pipeline(random_weights=True, sample_size=args.resolution or 256, seed=args.seed,
                                   device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        pipe = load_pipeline(args.model, device=args.device)
    device = pipe.device
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    print(f"model {args.model} on {device} ({pipe.unet.dtype}, {side}x{side} px), torch threads {torch.get_num_threads()}; "
          f"prompt {args.prompt!r}, words {args.words}, {steps} steps, 1 image, {repeats} repeats")

    def generate() -> np.ndarray:
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=steps, generator=gen, output_type="np").images

    def timed(collect: bool):
        sync(device)
        t0 = time.perf_counter()
        if collect:
            with attention_maps(pipe, words=args.words) as maps:
                out = generate()
        else:
            out, maps = generate(), None
        sync(device)
        return out, maps, time.perf_counter() - t0

    timed(False)  # warm-up of both paths
    timed(True)
    plain_t, coll_t = [], []
    for _ in range(repeats):  # alternate, so drifts in machine load hit both alike
        img_plain, _, t = timed(False)
        plain_t.append(t)
        img_coll, maps, t = timed(True)
        coll_t.append(t)

    mp, mc = statistics.median(plain_t), statistics.median(coll_t)
    print(f"\nplain generation         median {mp:.4f} s  (min {min(plain_t):.4f}, max {max(plain_t):.4f})")
    print(f"with attention_maps(...) median {mc:.4f} s  (min {min(coll_t):.4f}, max {max(coll_t):.4f})")
    print(f"ratio collector / plain  {mc / mp:.3f}  (overhead {100 * (mc / mp - 1):+.1f} %)")
    print(f"aggregate: {maps.n_layers} layers x {maps.n_steps} steps into {maps.stored_elements()} floats "
          f"(1 image x 77 tokens x {maps.resolution[0]}x{maps.resolution[1]}); shares "
          + ", ".join(f"{w} {float(s[0]):.3f}" for w, s in maps.shares.items())
          + f"; start {float(maps.special['start'][0]):.3f}, end {float(maps.special['end'][0]):.3f}, "
          f"padding {float(maps.special['padding'][0]):.3f} of the whole mass")
    print(f"image identical with and without the collector: {np.array_equal(img_plain, img_coll)} "
          f"(max |diff| {np.abs(img_plain - img_coll).max():.3g})")


if __name__ == "__main__":
    main()
