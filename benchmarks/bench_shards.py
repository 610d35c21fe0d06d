"""The same `persviz sweep` grid on 1 process x 2 threads and on 2 processes x 1 thread (accelerate, gloo on the CPU):
wall time of each whole command (model loading and the launch included), the ratio, and the largest difference
between the two results' per-image scores; then 1 process x 1 thread, which the sharded result must equal
(within 1e-6, else exit 1).

Default grid: checkers, rotations 0,0.2,0.4 x scales 0,0.5 x 8 prompts x 1 seed, 10 sampler steps, 2 prompts a cell
(24 cells); --small: rotations 0,0.4 x scale 0 x 2 prompts, 2 steps (4 cells). Each command runs in its own
subprocess, so the thread counts are its own (OMP_NUM_THREADS / MKL_NUM_THREADS set for it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from persviz.evaluation import Evaluation
from persviz.paths import DATA_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser  # noqa: E402


def run(args: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "persviz", *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def max_difference(a: Evaluation, b: Evaluation) -> float:
    if a.conditions != b.conditions:
        raise SystemExit(f"the two runs hold different conditions: {a.conditions} vs {b.conditions}")
    return max(float(np.max(np.abs(np.array(a.items[c][m]) - np.array(b.items[c][m]))))
               for c in a.conditions for m in a.metrics(c))


def main() -> int:
    ap = parser(__doc__, "4 cells at 2 sampler steps (about a minute)")
    ap.add_argument("--concept", default=str(DATA_DIR / "shapesworld" / "concepts" / "checkers"))
    a = ap.parse_args()
    if a.small:
        grid = ["--rotations", "0,0.4", "--scales", "0", "--prompts", "2", "--seeds", "1", "--steps", "2", "--chunk", "1"]
    else:
        grid = ["--rotations", "0,0.2,0.4", "--scales", "0,0.5", "--prompts", "8", "--seeds", "1", "--steps", "10",
                "--chunk", "2"]
    base = ["sweep", a.concept, *grid, "--batch-size", "2", "--no-progress"]
    with tempfile.TemporaryDirectory() as tmp:
        one, two, single = Path(tmp) / "one", Path(tmp) / "two", Path(tmp) / "single"
        t1 = run([*base, "--out", str(one), "--threads", "2"], 2)
        t2 = run([*base, "--out", str(two), "--processes", "2", "--threads", "1"], 1)
        t0 = run([*base, "--out", str(single), "--threads", "1"], 1)
        sharded = Evaluation.load(two / "sweep.json")
        diff = max_difference(Evaluation.load(one / "sweep.json"), sharded)
        same = max_difference(Evaluation.load(single / "sweep.json"), sharded)
        cells = len(list((one / "cells").glob("*.json")))
    print(f"persviz sweep {' '.join(grid)} ({cells} cells) on {os.cpu_count()} CPU cores")
    print(f"1 process x 2 threads    {t1:8.2f} s")
    print(f"2 processes x 1 thread   {t2:8.2f} s")
    print(f"ratio (1x2) / (2x1)      {t1 / t2:8.3f}")
    print(f"(1 process x 1 thread    {t0:8.2f} s)")
    print(f"max |difference| of the per-image scores, 1x2 vs 2x1: {diff:.3g} (thread counts differ)")
    print(f"max |difference| of the per-image scores, 1x1 vs 2x1: {same:.3g} (one thread per process)")
    return 0 if same <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
