"""How long the command line takes to start: `persviz --help`, `persviz inspect --help` and `persviz inspect FILE` (a
shipped ShapesWorld embedding, against the micro-SD's text encoder), each as a whole process, beside the reference
`python -c "import torch"` (what any command that computes must pay anyway); median wall time of each and its ratio
to the reference.

The commands alternate, one of each per round (`--repeats` rounds, default 7; --small: 2), so a burst of load on a
shared machine hits all of them; each runs as `python -m persviz ...` from `--root` (default: this repository; give
another checkout to time older code) with OMP_NUM_THREADS=MKL_NUM_THREADS=1 and HF_HUB_OFFLINE=1. A command that
exits non-zero, or a help that does not print its usage line, ends the benchmark with exit 1.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBEDDING = Path("data/shapesworld/concepts/candy/textual_inversion/learned_embeds.safetensors")


def commands(embedding: Path) -> dict[str, list[str]]:
    """{label: argv after the interpreter}: the reference first, then the persviz commands."""
    return {
        'python -c "import torch"': ["-c", "import torch"],
        "persviz --help": ["-m", "persviz", "--help"],
        "persviz inspect --help": ["-m", "persviz", "inspect", "--help"],
        f"persviz inspect {embedding.name}": ["-m", "persviz", "inspect", str(embedding), "--class-word", "square"],
    }


def timed(argv: list[str], root: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of one whole `python ARGV` process run in `root`, and its result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PERSVIZ_SCALE", None)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True)
    return time.perf_counter() - t, done


def main() -> int:
    ap = parser(__doc__, "2 rounds")
    ap.add_argument("--repeats", type=int, default=7, help="rounds of every command (default 7)")
    ap.add_argument("--root", default=str(ROOT), help="the source tree to run persviz from (default: this one)")
    ap.add_argument("--embedding", default=str(EMBEDDING), help="the file `persviz inspect` reads (relative to --root)")
    a = ap.parse_args()
    root, rounds = Path(a.root).resolve(), 2 if a.small else a.repeats
    cmds = commands(Path(a.embedding))
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(rounds):
        for label, argv in cmds.items():
            seconds, done = timed(argv, root)
            if done.returncode != 0 or ("--help" in argv and "usage: persviz" not in done.stdout):
                print(f"{label} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
                return 1
            times[label].append(seconds)
    reference = statistics.median(times[next(iter(cmds))])
    print(f"{root} on {os.cpu_count()} CPU cores, {rounds} rounds, OMP_NUM_THREADS=1")
    print(f"{'command':44s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'/ import torch':>15s}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:44s} {med:9.2f} {min(ts):7.2f} {max(ts):7.2f} {med / reference:14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
