"""Vectorized semantic-shift metrics (persviz.tea.shift) vs the loop references (persviz.tea.reference).

Two seeded random prompt sets P, Q of N prompts each, 77 x D hidden states (float32, like a text encoder's
output; default N=200, D=768, the paper's setting). For every metric: time of the loop reference (one run),
time of the vectorized version (best of --repeats), their ratio, and the relative difference of the two
values, which must be <= 1e-5 (|vectorized - reference| / |reference|).

The Mahalanobis reference forms the F x F covariance explicitly (numpy.cov + numpy.linalg.pinv, or
sklearn's LedoitWolf): at F = 77 x 768 = 59136 that is 28 GB per matrix, so the Mahalanobis rows compare
both versions on the first --maha-features features of each flattened prompt (default 2048). The
vectorized metric at full F is timed alone on the last line (no reference possible).

    python benchmarks/bench_shift_metrics.py             # full size (about a minute at one thread)
    python benchmarks/bench_shift_metrics.py --small     # quick check: N=20, 77 x 32, 256 Mahalanobis features
"""
from __future__ import annotations

import time

import numpy as np
import torch

from common import parse_args, parser

from persviz.tea import reference as ref
from persviz.tea import shift as sm

TOLERANCE = 1e-5  # relative


def prompt_sets(n: int, tokens: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P, Q [n, tokens, dim] float32: a shared per-position template, per-prompt variation, Q shifted from P."""
    rng = np.random.default_rng(seed)
    template = rng.normal(size=(tokens, dim))
    shift = 0.5 * rng.normal(size=(tokens, dim))
    P = template + 0.3 * rng.normal(size=(n, tokens, dim))
    Q = template + shift + 0.3 * rng.normal(size=(n, tokens, dim))
    return torch.from_numpy(P.astype(np.float32)), torch.from_numpy(Q.astype(np.float32))


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(value, best wall time in seconds over repeats)."""
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return float(value), best


def main() -> None:
    ap = parser(__doc__, "N=20, 77 x 32, 256 Mahalanobis features")
    ap.add_argument("--n", type=int, default=None, help="prompts per set (default 200; --small 20)")
    ap.add_argument("--tokens", type=int, default=77)
    ap.add_argument("--dim", type=int, default=None, help="hidden size D (default 768; --small 32)")
    ap.add_argument("--maha-features", type=int, default=None,
                    help="features for the Mahalanobis comparison (default 2048; --small 256)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each vectorized metric (best is kept)")
    args = parse_args(ap)
    n = args.n or (20 if args.small else 200)
    dim = args.dim or (32 if args.small else 768)
    fm = min(args.maha_features or (256 if args.small else 2048), args.tokens * dim)

    # warm-up outside the timings: sklearn's import and first LedoitWolf fit
    ref.reference_mahalanobis_distance(np.eye(4)[:3], np.eye(4), "ledoit_wolf")

    P, Q = prompt_sets(n, args.tokens, dim, args.seed)
    Pm, Qm = P.reshape(n, -1)[:, :fm].contiguous(), Q.reshape(n, -1)[:, :fm].contiguous()
    F = args.tokens * dim
    print(f"P, Q: {n} prompts x {args.tokens} x {dim} (F = {F}), float32, seed {args.seed}; "
          f"Mahalanobis on the first {fm} features; torch threads {torch.get_num_threads()}")

    rows = [
        ("l2", lambda: sm.l2_distance(P, Q), lambda: ref.reference_l2_distance(P, Q)),
        ("intra_l2", lambda: sm.intra_l2(P), lambda: ref.reference_intra_l2(P)),
        ("hausdorff", lambda: sm.hausdorff_distance(P, Q), lambda: ref.reference_hausdorff_distance(P, Q)),
        ("intra_hausdorff", lambda: sm.intra_hausdorff(P), lambda: ref.reference_intra_hausdorff(P)),
        ("kl (tau 1)", lambda: sm.kl_divergence(P, Q), lambda: ref.reference_kl_divergence(P, Q)),
        (f"mahalanobis pinv [F={fm}]", lambda: sm.mahalanobis_distance(Pm, Qm, "pinv"),
         lambda: ref.reference_mahalanobis_distance(Pm, Qm, "pinv")),
        (f"mahalanobis ledoit_wolf [F={fm}]", lambda: sm.mahalanobis_distance(Pm, Qm, "ledoit_wolf"),
         lambda: ref.reference_mahalanobis_distance(Pm, Qm, "ledoit_wolf")),
        (f"intra_mahalanobis lw [F={fm}]", lambda: sm.intra_mahalanobis(Pm, "ledoit_wolf"),
         lambda: ref.reference_mahalanobis_distance(Pm, Pm, "ledoit_wolf")),
    ]
    print(f"\n{'metric':34s} {'reference s':>11s} {'vectorized s':>12s} {'speed-up':>9s} {'value':>12s} "
          f"{'rel. diff':>9s}  (<= {TOLERANCE:g})")
    worst, failed = 0.0, []
    for name, vec, loop in rows:
        r_val, r_t = timed(loop)
        v_val, v_t = timed(vec, args.repeats)
        rel = abs(v_val - r_val) / max(abs(r_val), 1e-300)
        worst = max(worst, rel)
        ok = rel <= TOLERANCE
        if not ok:
            failed.append(name)
        print(f"{name:34s} {r_t:11.3f} {v_t:12.4f} {r_t / v_t:8.1f}x {v_val:12.6g} {rel:9.1e}  "
              f"{'ok' if ok else 'FAIL'}")
    _, t_all = timed(lambda: sum(sm.shift_distances(P, Q).values()), args.repeats)
    _, t_intra = timed(lambda: sum(sm.intra_distances(P).values()), args.repeats)
    print(f"\nat full F = {F} (no reference: its F x F covariance would take {F * F * 8 / 2**30:.2f} GiB): "
          f"shift_distances(P, Q) {t_all:.3f} s, intra_distances(P) {t_intra:.3f} s")
    print(f"largest relative difference {worst:.1e}: "
          + ("all within 1e-5" if not failed else f"OVER 1e-5 for {', '.join(failed)}"))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
