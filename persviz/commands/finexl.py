"""``persviz finexl train | benchmark | explain``: FineXL's LoRA variants, its benchmark, one model pair explained."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from persviz.commands.common import add_grid_options, doc, grid_models, relaunch, threads
from persviz.constants import EXPLAIN_CHUNK, FINEXL_CACHE_DIR, N_BOOT_BENCH


def add_parser(sub: Any) -> None:
    """Adds ``finexl`` and its actions."""
    fx = sub.add_parser("finexl", help="FineXL's LoRA variants and ground-truth benchmark").add_subparsers(
        dest="action", required=True)
    p = fx.add_parser("train", help="fine-tune the LoRA variants of the micro-SD")
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default=str(FINEXL_CACHE_DIR / "runs"))
    p.set_defaults(run=train)

    p = fx.add_parser("calibrate", help="train the LoRA variants until they realize their designed levels (the "
                      "pre-registered search of docs/finexl.md, Finding (v)); resumable, ships to data/finexl/lora/",
                      description=doc("persviz.finexl.calibrate"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=None, help="default: all 15")
    p.add_argument("--out", default=str(FINEXL_CACHE_DIR / "calibration"), help="the search's state and runs")
    p.add_argument("--no-ship", action="store_true", help="leave data/finexl/lora/ as it is")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=calibrate)

    p = fx.add_parser("diagnose", help="the shipped LoRA variants' realized levels at guidance 1 and 4 (held-out "
                      "probes and seeds)")
    p.add_argument("--variants", nargs="*", default=None, help="default: all 15")
    p.add_argument("--guidances", default="1,4", help="comma-separated guidance scales")
    p.add_argument("--out", default=None, help="a JSON file for the result (default: print only)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=diagnose)

    p = fx.add_parser("benchmark", help="run the benchmark (writes data/finexl/benchmark.json and .md)")
    p.add_argument("--no-lora", action="store_true", help="renderer variants only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-boot", type=int, default=N_BOOT_BENCH,
                   help="bootstrap draws over the probe prompts for the intervals (0: none)")
    p.set_defaults(run=benchmark)

    p = fx.add_parser("explain", help="FineXL's paired samples and decomposition for one model pair (a model "
                      "without and with one LoRA); sharded, resumable", description=doc("persviz.finexl.model_pair"),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", required=True, help="a diffusers LoRA file or folder, a concept folder with a "
                   "DreamBooth-LoRA run, or a shipped ShapesWorld variant of data/finexl/lora/ (e.g. red_100)")
    p.add_argument("--class-word", default=None, help="the probes' class word at full scale (default: the "
                   "concept's, else dog)")
    p.add_argument("--model", default=None, help="the base model (default: a concept folder's model, else the "
                   "ShapesWorld micro-SD; stable-diffusion-v1-5/stable-diffusion-v1-5 for SD 1.5)")
    p.add_argument("--out", required=True, help="results folder: cells/, manifest.json, explain.json")
    p.add_argument("--prompts", type=int, default=None, help="probe prompts (default: 48 ShapesWorld, 24 SD 1.5)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (call seeds 0, 1000, ...)")
    p.add_argument("--chunk", type=int, default=EXPLAIN_CHUNK, help="prompts per cell")
    p.add_argument("--methods", default=None, help="comma-separated benchmark methods (default: finexl,persviz on "
                   "ShapesWorld, finexl,finexl_improved on SD 1.5)")
    add_grid_options(p, dino=False)
    p.set_defaults(run=explain)


def train(a: argparse.Namespace) -> None:
    """Fine-tunes the LoRA variants and ships them to data/finexl/lora/."""
    from persviz.finexl import benchmark as finexl_benchmark
    threads(max(1, a.threads))
    shipped = finexl_benchmark.train_variants(a.variants or None, steps=a.steps, batch_size=a.batch_size,
                                              lr=a.lr, device=a.device, runs_dir=Path(a.runs_dir))
    total = sum(p.stat().st_size for p in shipped.values())
    print(f"shipped {len(shipped)} LoRA variants to {finexl_benchmark.LORA_DIR} ({total / 1e6:.2f} MB)")


def calibrate(a: argparse.Namespace) -> Any:
    """The pre-registered calibration of the LoRA variants (resumable); prints each variant's chosen round."""
    from persviz.finexl import calibrate as finexl_calibrate
    threads(max(1, a.threads))
    state = finexl_calibrate.calibrate(a.variants or None, out=Path(a.out), ship=not a.no_ship)
    print("steps per aspect:", state["steps"])
    for n, rec in state["variants"].items():
        r = rec["rounds"][rec["chosen"]]
        got = ", ".join(f"{k}: {r['realized'][k]:.2f}" for k in rec["designed"])
        print(f"{n}: designed {rec['designed']}, trained at {r['rates']} for {rec['steps']} steps; selection "
              f"realized {got}")
    return state


def diagnose(a: argparse.Namespace) -> Any:
    """The shipped variants' realized levels at several guidance scales."""
    from persviz.finexl import calibrate as finexl_calibrate
    from persviz.io import write_json
    threads(max(1, a.threads))
    g = tuple(float(x) for x in a.guidances.split(",") if x.strip())
    out = finexl_calibrate.diagnose(a.variants or None, guidances=g)
    for n, rec in out.items():
        cells = [f"{asp} {p:.2f}: " + ", ".join(f"g{k} {rec[k]['realized'][asp]:.2f}" for k in rec if k != "rates")
                 for asp, p in rec["rates"].items()]
        print(f"{n}: " + "; ".join(cells))
    if a.out:
        write_json(a.out, out)
    return out


def benchmark(a: argparse.Namespace) -> None:
    """Runs the ground-truth benchmark; prints and writes its report."""
    from persviz.finexl import benchmark as finexl_benchmark
    threads(max(1, a.threads))
    result = finexl_benchmark.run(lora=not a.no_lora, n_boot=a.n_boot)
    print(finexl_benchmark.markdown_report(result))
    print(f"wrote {finexl_benchmark.BENCHMARK_JSON} and {finexl_benchmark.BENCHMARK_MD}")


def explain(a: argparse.Namespace) -> Any:
    """FineXL's pairs and decomposition of one model pair (sharded): OUT/explain.json (the main process)."""
    code = relaunch(a)  # before the imports: the launching process only waits
    if code is not None:
        return code
    from persviz.finexl import model_pair as finexl_explain
    from persviz.loading import FULL_DEFAULTS, SHAPESWORLD
    from persviz.tea import concept_study
    threads(a.threads)
    target = finexl_explain.pair_target(a.lora, a.class_word)  # a missing LoRA fails before any model loads
    model = a.model or (target.concept.model if target.concept is not None else SHAPESWORLD)
    small = model == SHAPESWORLD
    inputs = finexl_explain.pair_inputs(small, target.class_word, a.prompts)
    if a.seeds < 1:
        raise SystemExit(f"persviz {a.command}: --seeds must be at least 1; got {a.seeds}")
    seeds = [j * max(1000, len(inputs["probes"])) for j in range(a.seeds)]
    finexl_explain.explain_cells(len(inputs["probes"]), a.chunk)
    state, pipe, clip, _, _ = grid_models(a, model, judges=("clip",))
    gen = concept_study.StudySettings(steps=a.steps, guidance=a.guidance, batch_size=a.batch_size).generation(small)
    methods = a.methods.split(",") if a.methods else inputs["methods"]
    result = finexl_explain.explain_pair(
        pipe, target.lora, inputs["probes"], a.out, seeds, a.chunk, clip, inputs["bank"], methods,
        phrases=inputs["phrases"], steps=gen["steps"], guidance=gen["guidance"], batch_size=gen["batch_size"],
        settings={"model": str(model), "label": target.label, "class_word": target.class_word,
                  "clip": str(a.clip or (SHAPESWORLD if small else FULL_DEFAULTS["clip"]))},
        state=state, progress=not a.no_progress)
    if result is not None:
        print(f"wrote {Path(a.out) / finexl_explain.EXPLAIN_JSON}: {target.label}, {result['counts']['pairs']} "
              f"pairs ({state.num_processes} process(es))")
        for m, r in result["methods"].items():
            print(f"  {m} (e = {r['relative_residual']:.2f}): " + "; ".join(r["sentences"]))
    return result
