"""The door: ``persviz``, one command line for the main job and every maintenance command.

    persviz notebooks --out outputs                  # the main job: execute every notebook, write copies and figures
    persviz train textual-inversion --images DIR --class-word WORD --placeholder "<tok>" --out CONCEPT_DIR
    persviz adopt ti RUN --out CONCEPT_DIR --images DIR --class-word WORD   # another tool's run, as it is
    persviz study CONCEPT_DIR                        # shift tracker, impacts, with/without-TEA table: JSON, figures
    persviz shapesworld train [--stages unet]        # retrain the ShapesWorld models (resumable)
    persviz shapesworld evaluate                     # re-measure them: data/shapesworld/metrics.json, MODEL_CARD.md
    persviz shapesworld concepts                     # the personal concepts' reference images
    persviz tea runs --study --table                 # TEA's ShapesWorld runs of the three methods, study, table
    persviz finexl train | persviz finexl benchmark  # FineXL's LoRA variants; the ground-truth benchmark
    persviz pigeon train --stage 1 | persviz pigeon study
    persviz inspect FILE [--class-word W]            # any tool's embedding file: norms, |V*|/|c|, cos, nearest words
    persviz fix FILE --class-word W --out NEW        # TEA baked into a new file of the same format
    persviz doctor                                   # versions, device, cached Hub models, what to download

The maintenance commands always work on ShapesWorld, whatever ``PERSVIZ_SCALE`` says. This module (with
``persviz/__main__.py`` and the notebook runner) sits above the three rooms and may import all of them; nothing
in the library imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from persviz import run_notebooks
from persviz.finexl import benchmark as finexl_benchmark
from persviz.finexl import model_pair as finexl_explain
from persviz.generation import GUIDANCE
from persviz import doctor, embedding_files, foreign_runs, shards
from persviz.errors import PersvizError, TrainingInterrupted, describe, one_line
from persviz.io import check_write, confined, to_jsonable, write_json
from persviz.concept_folder import check_method, concept_paths, format_paths, read_concept
from persviz.methods import get_method
from persviz.loading import FULL_DEFAULTS, SHAPESWORLD, default_model, load_evaluator, load_pipeline
from persviz.paths import SHAPESWORLD_DIR
from persviz.pigeon import study as pigeon_study
from persviz.pigeon import train as pigeon_train
from persviz.pigeon.model import PigeonPipeline, build_model, read_config, tiny_pipeline
from persviz.pigeon.users import REGIMES, make_datasets
from persviz.shapesworld import evaluate as world_evaluate
from persviz.shapesworld import train as world_train
from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR, write_references
from persviz.tea import attention_study, concept_study, fix_file, inspect_file, shapesworld_runs
from persviz.tea import sweep as tea_sweep
from persviz.trainers import METHODS, concept_runs


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


# ----------------------------------------------------------------------------- shapesworld


def _add_shapesworld(sub: Any) -> None:
    world = sub.add_parser("shapesworld", help="train or re-measure the embedded ShapesWorld models").add_subparsers(
        dest="action", required=True)
    p = world.add_parser("train", help=world_train.__doc__.splitlines()[0], description=world_train.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(world_train.STAGES),
                   help=f"comma-separated subset of {world_train.STAGES}")
    p.add_argument("--force", action="store_true", help="run stages even if their output exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--train-size", type=int, default=world_train.TRAIN_SIZE, help="rendered training images")
    p.add_argument("--oracle-size", type=int, default=60_000, help="rendered images for the oracle")
    p.add_argument("--clip-steps", type=int, default=1200)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-decoder-steps", type=int, default=2500)
    p.add_argument("--oracle-steps", type=int, default=2000)
    p.add_argument("--dino-steps", type=int, default=300)
    p.add_argument("--unet-steps", type=int, default=9300)
    p.add_argument("--second-boost-start", type=int, default=6300,
                   help="UNet step from which half of each batch has a second object (and the LR decays)")
    p.add_argument("--offset-noise", type=float, default=0.15, help="strength of offset noise in UNet training")
    p.add_argument("--offset-noise-start", type=int, default=3200, help="UNet step from which offset noise is used")
    p.set_defaults(run=lambda a: world_train.run_stages(a))
    p = world.add_parser("evaluate", help=world_evaluate.__doc__.splitlines()[0], description=world_evaluate.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--out", default=str(SHAPESWORLD_DIR / "metrics.json"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    def evaluate(a: argparse.Namespace) -> None:
        _threads(a.threads)
        print(json.dumps(world_evaluate.evaluate_all(a.prompts, a.guidance, Path(a.out)), indent=2))
    p.set_defaults(run=evaluate)
    p = world.add_parser("concepts", help="write the personal concepts' reference images and concepts.json")

    def concepts(a: argparse.Namespace) -> None:
        write_references()
        print(f"wrote {len(CONCEPTS)} concepts to {CONCEPTS_DIR}")
    p.set_defaults(run=concepts)


# ----------------------------------------------------------------------------- tea


def _add_tea(sub: Any) -> None:
    tea = sub.add_parser("tea", help="TEA's ShapesWorld runs").add_subparsers(dest="action", required=True)
    p = tea.add_parser("runs", help="train (or resume) the shipped runs; optionally their study and the TEA table",
                       description=shapesworld_runs.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--concepts", default=",".join(CONCEPTS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--study", action="store_true", help="also write each Textual Inversion run's study.json")
    p.add_argument("--table", action="store_true", help="write concepts/tea_table.json (all methods, with/without TEA, "
                   "per-image scores and intervals)")

    def runs(a: argparse.Namespace) -> None:
        _threads(a.threads)
        methods = [m for m in a.methods.split(",") if m]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {METHODS}")
        pipe = load_pipeline()
        judges = shapesworld_runs.evaluators() if a.study or a.table else None
        for method in methods:
            for name in a.concepts.split(","):
                shapesworld_runs.RUNNERS[method](pipe, name)
                if a.study and get_method(method).row_snapshots:
                    shapesworld_runs.study_textual_inversion(pipe, name, judges)
        if a.table:
            shapesworld_runs.tea_table(pipe, judges)
    p.set_defaults(run=runs)

    p = tea.add_parser("evaluate", help="re-measure the shipped runs with the evaluation protocol (no training): "
                       "concepts/tea_table.json and adaptive_tea.json, per-image scores and intervals")
    p.add_argument("--what", default="table,adaptive", help="comma-separated: 'table' (with/without TEA, every "
                   "method), 'adaptive' (adaptive against fixed TEA on the Textual Inversion runs)")
    p.add_argument("--probes", type=int, default=24, help="prompts per concept of the table (2 seeds each; default 24)")
    p.add_argument("--adaptive-probes", type=int, default=8, help="prompts per concept of adaptive TEA (4 seeds each)")
    p.add_argument("--threads", type=int, default=None)

    def evaluate_runs(a: argparse.Namespace) -> None:
        _threads(a.threads)
        what = [w for w in a.what.split(",") if w]
        unknown = sorted(set(what) - {"table", "adaptive"})
        if unknown:
            raise SystemExit(f"unknown --what {unknown}; choose from table, adaptive")
        missing = [str(shapesworld_runs.run_dir(m, n)) for m in METHODS for n in CONCEPTS
                   if not shapesworld_runs.run_dir(m, n).is_dir()]
        if missing:
            raise SystemExit(f"no shipped run in {missing[0]}; train it with `persviz tea runs`")
        pipe, judges = load_pipeline(), shapesworld_runs.evaluators()
        if "table" in what:
            print("wrote", shapesworld_runs.tea_table(pipe, judges, n_probes=a.probes) and
                  shapesworld_runs.RUNS_DIR / "tea_table.json")
        if "adaptive" in what:
            print("wrote", shapesworld_runs.adaptive_table(pipe, judges, n_probes=a.adaptive_probes) and
                  shapesworld_runs.RUNS_DIR / "adaptive_tea.json")
    p.set_defaults(run=evaluate_runs)

    p = tea.add_parser("attention", help="where the learned token looks: leak and context shares over the shipped "
                       "Textual Inversion steps and with/without TEA (all methods), against ShapesWorld's regions",
                       description=attention_study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", default=",".join(CONCEPTS))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--ti-steps", default=",".join(str(s) for s in range(0, 3001, attention_study.STEP_EVERY)),
                   help="Textual Inversion steps (0: the class word's row)")
    p.add_argument("--probes", type=int, default=24, help="prompts per concept (tea_table's; default 24)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    p.add_argument("--out", default=str(attention_study.STUDY_JSON))
    p.add_argument("--work", default=None, help="the cells' folder (default: OUT without .json, + '.cells')")
    _add_grid_options(p, dino=False)
    p.set_defaults(batch_size=48)

    def attention(a: argparse.Namespace) -> Any:
        if _relaunch(a) is not None:
            return None
        _threads(a.threads)
        methods = [check_method(m) for m in a.methods.split(",") if m]
        try:
            ti_steps = [int(s) for s in a.ti_steps.split(",") if s]
        except ValueError:
            raise SystemExit(f"--ti-steps takes comma-separated integers, e.g. 0,300,3000; got {a.ti_steps!r}")
        state, pipe, _, _, oracle = _grid_models(a, SHAPESWORLD, judges=("oracle",))
        gen = concept_study.StudySettings(steps=a.steps, guidance=a.guidance, batch_size=a.batch_size).generation(True)
        out = Path(a.out)
        study = attention_study.run_attention_study(
            pipe, oracle, a.work or out.with_suffix(".cells"), out, [c for c in a.concepts.split(",") if c], ti_steps,
            methods, a.probes, a.seeds, gen["guidance"], gen["steps"], gen["batch_size"], state=state,
            progress=not a.no_progress)
        if study is not None:
            print(f"wrote {out}: {len(study['all']['intervals'])} conditions ({state.num_processes} process(es))")
        return study
    p.set_defaults(run=attention)


# ----------------------------------------------------------------------------- finexl


def _add_finexl(sub: Any) -> None:
    fx = sub.add_parser("finexl", help="FineXL's LoRA variants and ground-truth benchmark").add_subparsers(
        dest="action", required=True)
    p = fx.add_parser("train", help="fine-tune the LoRA variants of the micro-SD")
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default=str(finexl_benchmark.CACHE_DIR / "runs"))

    def train(a: argparse.Namespace) -> None:
        _threads(max(1, a.threads))
        shipped = finexl_benchmark.train_variants(a.variants or None, steps=a.steps, batch_size=a.batch_size,
                                                  lr=a.lr, device=a.device, runs_dir=Path(a.runs_dir))
        total = sum(p.stat().st_size for p in shipped.values())
        print(f"shipped {len(shipped)} LoRA variants to {finexl_benchmark.LORA_DIR} ({total / 1e6:.2f} MB)")
    p.set_defaults(run=train)
    p = fx.add_parser("benchmark", help="run the benchmark (writes data/finexl/benchmark.json and .md)")
    p.add_argument("--no-lora", action="store_true", help="renderer variants only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-boot", type=int, default=finexl_benchmark.N_BOOT_BENCH,
                   help="bootstrap draws over the probe prompts for the intervals (0: none)")

    def bench(a: argparse.Namespace) -> None:
        _threads(max(1, a.threads))
        result = finexl_benchmark.run(lora=not a.no_lora, n_boot=a.n_boot)
        print(finexl_benchmark.markdown_report(result))
        print(f"wrote {finexl_benchmark.BENCHMARK_JSON} and {finexl_benchmark.BENCHMARK_MD}")
    p.set_defaults(run=bench)
    p = fx.add_parser("explain", help="FineXL's paired samples and decomposition for one model pair (a model "
                      "without and with one LoRA); sharded, resumable", description=finexl_explain.__doc__,
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
    p.add_argument("--chunk", type=int, default=finexl_explain.CHUNK, help="prompts per cell")
    p.add_argument("--methods", default=None, help="comma-separated benchmark methods (default: finexl,persviz on "
                   "ShapesWorld, finexl,finexl_improved on SD 1.5)")
    _add_grid_options(p, dino=False)

    def explain(a: argparse.Namespace) -> Any:
        code = _relaunch(a)
        if code is not None:
            return code
        _threads(a.threads)
        target = finexl_explain.pair_target(a.lora, a.class_word)  # a missing LoRA fails before any model loads
        model = a.model or (target.concept.model if target.concept is not None else SHAPESWORLD)
        small = model == SHAPESWORLD
        inputs = finexl_explain.pair_inputs(small, target.class_word, a.prompts)
        if a.seeds < 1:
            raise SystemExit(f"persviz {a.command}: --seeds must be at least 1; got {a.seeds}")
        seeds = [j * max(1000, len(inputs["probes"])) for j in range(a.seeds)]
        finexl_explain.explain_cells(len(inputs["probes"]), a.chunk)
        state, pipe, clip, _, _ = _grid_models(a, model, judges=("clip",))
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
    p.set_defaults(run=explain)


# ----------------------------------------------------------------------------- pigeon


def _pigeon_pipeline(a: argparse.Namespace, stage: int, init: str | None) -> tuple[PigeonPipeline, str]:
    """The pipeline a training run starts from: the ShapesWorld backbone, or random tiny ones with --tiny."""
    overrides = {k: v for k, v in (("d_model", a.d_model), ("n_layers", a.n_layers),
                                   ("n_out_tokens", a.n_out_tokens), ("condition", a.condition)) if v is not None}
    config = read_config(init) if stage == 2 else None
    if stage == 2 and overrides:
        raise SystemExit("stage 2 takes the model settings of its stage-1 run; drop --d-model/--n-layers/...")
    if a.tiny:  # the frozen tiny parts are always seed 0; --seed sets the trainable modules' init
        pipe = tiny_pipeline(config, seed=0, **({"d_model": 32} | overrides) if config is None else {})
        if stage == 1:
            fresh = build_model(pipe.scorer.model, pipe.scorer.tokenizer, pipe.model.config.cross_attention_dim,
                                pipe.model.prompt_encoder, pipe.model.config, seed=a.seed)
            pipe.model.load_trainable_state_dict(fresh.trainable_state_dict())
        return pipe, "tiny"
    return PigeonPipeline.from_shapesworld(config=config, device=a.device, seed=a.seed, **overrides), "shapesworld"


def _pigeon_root(regime: str | None) -> Path:
    """Where a regime's runs and table go by default: data/pigeon (image regime), data/pigeon/token."""
    return pigeon_train.OUT_DIR / "token" if regime == "token" else pigeon_train.OUT_DIR


def _add_pigeon(sub: Any) -> None:
    pg = sub.add_parser("pigeon", help="Pigeon's training stages and comparison table").add_subparsers(
        dest="action", required=True)
    p = pg.add_parser("train", help="train stage 1 (masked reconstruction), stage 2 (DPO) or the baseline",
                      description=pigeon_train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("1", "2", "baseline"), default="1",
                   help="1, 2, or baseline (stage 1's losses, every history token read, no history mask)")
    p.add_argument("--regime", choices=REGIMES, default=None,
                   help="the users' noise: image (whole noise images) or token (distractor tokens in liked images); "
                        "default image, stage 2: the regime of its stage-1 run (--init)")
    p.add_argument("--out", default=None, help="output folder (default data/pigeon/stage{N} or baseline; "
                                                 "with --regime token under data/pigeon/token/)")
    p.add_argument("--init", default=None, help="stage 2: the stage-1 folder (default: stage1 beside --out)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default 3e-4 (stage 1), 1e-5 (stage 2)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="stage 1 min-SNR weighting; 0: plain MSE")
    p.add_argument("--aux-weight", type=float, default=0.1, help="stage 1 target-embedding loss weight; 0: off")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-users", type=int, default=1000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--noise-rates", type=_floats, default=None,
                   help="e.g. 0,0.2,0.4,0.6 (default: image 0,0.2,0.4,0.6; token 0,0.2,0.4)")
    p.add_argument("--beta", type=float, default=0.1, help="stage 2 DPO beta (diffusers convention)")
    p.add_argument("--n-pairs", type=int, default=2000)
    p.add_argument("--pair-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-out-tokens", type=int, default=None)
    p.add_argument("--condition", choices=("text+tokens", "tokens"), default=None)
    p.add_argument("--eval", type=int, default=0, help="after training: judge N validation windows with the oracle")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="random tiny backbones (smoke test)")
    p.add_argument("--no-progress", action="store_true")

    def train(a: argparse.Namespace) -> pigeon_train.TrainResult:
        _threads(a.threads)
        stage = 2 if a.stage == "2" else 1
        root = _pigeon_root(a.regime)
        out = Path(a.out) if a.out else root / ("baseline" if a.stage == "baseline" else f"stage{stage}")
        init = None
        regime = a.regime or "image"
        if stage == 2:
            init = a.init or str((Path(a.out).parent if a.out else root) / "stage1")
            regime = a.regime or pigeon_study.training_regime(init)
        config = pigeon_train.TrainConfig(
            stage=stage, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
            snr_gamma=a.snr_gamma or None, aux_weight=a.aux_weight, save_every=a.save_every, seed=a.seed,
            n_users=a.n_users, data_seed=a.data_seed, noise_rates=a.noise_rates, init_from=init, beta=a.beta,
            n_pairs=a.n_pairs, pair_steps=a.pair_steps, guidance_scale=a.guidance_scale, regime=regime,
            history_mask=a.stage != "baseline")
        pipe, backbone = _pigeon_pipeline(a, stage, init)
        result = pigeon_train.train(pipe, config, out, progress=not a.no_progress, backbone=backbone)
        last = result.losses[-1] if result.losses else float("nan")
        print(f"stage {a.stage}: {result.steps} steps, last loss {last:.4f}; weights in {result.final_path}")
        if a.eval > 0:
            val = make_datasets(config.n_users, config.data_seed, config.noise_rates, config.n_interactions,
                                regime=config.regime)["val"]
            report = pigeon_train.evaluate(pipe, val, a.eval, load_evaluator(kind="oracle"))
            print(json.dumps(report, indent=1))
            write_json(out / "eval.json", report)
        return result
    p.set_defaults(run=train)
    p = pg.add_parser("study", help="write the comparison table (default data/pigeon/comparison.json)",
                      description=pigeon_study.comparison_table.__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=REGIMES, default=None,
                   help="held-out users' noise: image or token (default: the stage-1 run's; the default folders "
                        "of --regime token lie under data/pigeon/token/)")
    p.add_argument("--stage1", default=None, help="default data/pigeon/stage1 (token: data/pigeon/token/stage1)")
    p.add_argument("--stage2", default=None, help="default beside stage1's default; 'none' leaves the row out")
    p.add_argument("--baseline", default=None,
                   help="the trained baseline's folder (default: none; token: data/pigeon/token/baseline); 'none' "
                        "leaves the row out")
    p.add_argument("--n-windows", type=int, default=50)
    p.add_argument("--noise-rates", default="0,0.2,0.4",
                   help="comma-separated; image: multiples of 0.2, token: shares of distractor tokens up to 0.5")
    p.add_argument("--split", default="test")
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="default data/pigeon/comparison.json (token: "
                                                 "data/pigeon/token/comparison.json)")

    def study(a: argparse.Namespace) -> list[dict[str, Any]]:
        _threads(a.threads)
        root = _pigeon_root(a.regime)
        stage1 = a.stage1 or str(root / "stage1")
        stage2 = a.stage2 or str(root / "stage2")
        baseline = a.baseline or (str(root / "baseline") if a.regime == "token" else "none")
        out = a.out or str(root / "comparison.json")
        extra = {k: v for k, v in (("regime", a.regime),
                                   ("baseline", None if baseline.lower() == "none" else baseline)) if v is not None}
        rows = pigeon_study.comparison_table(
            stage1, None if stage2.lower() == "none" else stage2, a.n_windows, _floats(a.noise_rates), a.split,
            seed=a.seed, batch_size=a.batch_size, num_inference_steps=a.steps, path=out, **extra)
        print(pigeon_study.format_table(rows))
        print(pigeon_study.format_differences(rows))
        if any(f"vs_{pigeon_study.TRAINED_BASELINE}" in r for r in rows):
            print(pigeon_study.format_differences(rows, against=pigeon_study.TRAINED_BASELINE))
        if any("masks" in r for r in rows):
            print(pigeon_study.format_mask_measures(rows))
        print(f"written to {out}")
        return rows
    p.set_defaults(run=study)


# ----------------------------------------------------------------------------- notebooks


def _add_notebooks(sub: Any) -> None:
    p = sub.add_parser("notebooks", help="the main job: execute every notebook; write the copies and their figures",
                       description=run_notebooks.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs", help="folder for executed notebooks and figures")
    p.add_argument("--scale", choices=run_notebooks.SCALES, default=None,
                   help="shapesworld (default) or full; wins over PERSVIZ_SCALE")
    p.add_argument("--format", default="png", help="figure formats, comma-separated: png, svg, pdf")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: all in notebooks/)")

    def notebooks(a: argparse.Namespace) -> int:
        runs = run_notebooks.run_all(a.notebooks, Path(a.out), a.scale, a.format.split(","), a.timeout)
        print(run_notebooks.summary_table(runs))
        return run_notebooks.exit_code(runs)
    p.set_defaults(run=notebooks)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a concept of your own into a concept folder (resumable)",
                       description=concept_runs.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=("textual-inversion", "ti", "dreambooth", "custom-diffusion"))
    p.add_argument("--images", required=True, help="folder of the concept's photos")
    p.add_argument("--class-word", required=True, help="the concept's class, one token (e.g. dog, toy)")
    p.add_argument("--placeholder", required=True, help="the concept's new token, e.g. '<my-dog>'")
    p.add_argument("--identifier", default=None, help="DreamBooth's rare token (default: sks)")
    p.add_argument("--out", required=True, help="the concept folder (created; an existing one is extended)")
    p.add_argument("--model", default=None,
                   help="Hub id or folder (default: the ShapesWorld micro-SD; SD 1.5 with PERSVIZ_SCALE=full)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-class-images", type=int, default=None,
                   help="DreamBooth / Custom Diffusion prior-preservation images (generated once by the base model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")

    def train(a: argparse.Namespace) -> concept_runs.ConceptRun:
        _threads(a.threads)
        run = concept_runs.train_concept(
            a.method, a.images, a.class_word, a.placeholder, a.out, a.model or default_model("pipeline"), a.identifier,
            progress=not a.no_progress,
            steps=a.steps, save_every=a.save_every, resolution=a.resolution, lr=a.lr, batch_size=a.batch_size,
            seed=a.seed, num_class_images=a.num_class_images)
        print(f"{run.method}: {run.result.steps} steps in {run.run_dir} (concept folder {run.concept.folder})")
        return run
    p.set_defaults(run=train)


def _add_adopt(sub: Any) -> None:
    p = sub.add_parser("adopt", help="register another tool's run folder (diffusers, A1111, kohya) in a concept folder",
                       description=foreign_runs.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=("textual-inversion", "ti", "dreambooth", "custom-diffusion"))
    p.add_argument("run_folder", metavar="RUN", help="the folder (or LoRA file) the other tool wrote; recorded, not copied")
    p.add_argument("--out", required=True, help="the concept folder (created; an existing one is extended)")
    p.add_argument("--images", required=True, help="folder of the concept's photos")
    p.add_argument("--class-word", default=None, help="the concept's class, one token (e.g. dog, toy)")
    p.add_argument("--token", default=None,
                   help="the run's token where its files do not name it (DreamBooth's identifier: default sks)")
    p.add_argument("--model", default=None,
                   help="the model the run was trained on (default: the ShapesWorld micro-SD; SD 1.5 with "
                        "PERSVIZ_SCALE=full)")

    def adopt(a: argparse.Namespace) -> Any:
        concept = foreign_runs.adopt_run(a.method, a.run_folder, a.out, a.images, a.class_word, a.token,
                                         a.model or default_model("pipeline"))
        method = check_method(a.method)
        run = concept.runs[method]
        print(f"{method}: {run['source']} run {run['folder']} (token {run['token']!r}) in concept folder "
              f"{concept.folder}")
        return concept
    p.set_defaults(run=adopt)


# ----------------------------------------------------------------------------- inspect / fix (embedding files)


def _text_model(a: argparse.Namespace) -> tuple[Any, Any]:
    """(tokenizer, text_encoder) of --model; a model that cannot be loaded ends the command with the reason."""
    try:
        return inspect_file.load_text_model(a.model)
    except OSError as err:
        raise SystemExit(f"persviz {a.command}: {err}") from None


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="the collapse diagnosis of one embedding file (any tool's format)",
                       description=inspect_file.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a Textual Inversion / Custom Diffusion token file (diffusers, A1111 .pt or image "
                   "embedding, kohya, the original Textual Inversion), or a folder of several: each is listed")
    p.add_argument("--model", default=None, help="Hub id or folder (default: ShapesWorld; SD 1.5 with PERSVIZ_SCALE=full)")
    p.add_argument("--class-word", default=None, help="one-token class word: adds |V*|/|c| and cos(V*, c)")
    p.add_argument("--nearest", type=int, default=5, help="nearest vocabulary words per row")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(a: argparse.Namespace) -> Any:
        if Path(a.file).expanduser().is_dir() and not any((Path(a.file).expanduser() / n).is_file()
                                                          for n in embedding_files.FOLDER_FILES):
            embedding_files.read_embedding_folder(a.file)  # a folder without embeddings: its sentence, no model load
            found = inspect_file.inspect_folder(a.file, _text_model(a), a.class_word, a.nearest,
                                                model_name=str(a.model or default_model("pipeline")))
            print(json.dumps(to_jsonable({str(p): r.to_dict() if isinstance(r, inspect_file.InspectReport) else
                                          {"error": str(r)} for p, r in found}), indent=1) if a.json
                  else inspect_file.folder_text(a.file, found))
            return found
        f = embedding_files.read_embedding_file(a.file)
        tokenizer, encoder = _text_model(a)
        report = inspect_file.inspect_file(f, (tokenizer, encoder), a.class_word, a.nearest,
                                           model_name=str(a.model or default_model("pipeline")))
        print(json.dumps(to_jsonable(report.to_dict()), indent=1) if a.json else report.to_text())
        return report
    p.set_defaults(run=run)


def _add_fix(sub: Any) -> None:
    p = sub.add_parser("fix", help="bake token-level TEA into a new embedding file of the same format",
                       description=fix_file.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the embedding file to repair (left as it is)")
    p.add_argument("--class-word", required=True, help="the concept's class, one token (e.g. dog)")
    p.add_argument("--out", required=True, help="the new file (never the input); an A1111 image embedding is written "
                   "as NAME.safetensors")
    p.add_argument("--rotation", type=float, default=None, help="default: tea.DEFAULTS[method]")
    p.add_argument("--scale", type=float, default=None, help="default: tea.DEFAULTS[method]")
    p.add_argument("--method", default="textual_inversion", help="whose TEA defaults to use")
    p.add_argument("--model", default=None, help="Hub id or folder (default: ShapesWorld; SD 1.5 with PERSVIZ_SCALE=full)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")

    def run(a: argparse.Namespace) -> fix_file.FixResult:
        fix_file.check_knobs(a.method, a.rotation, a.scale)
        f = embedding_files.read_embedding_file(a.file)
        fix_file.out_path(f.path, a.out, a.force, f.format == "a1111-image")
        result = fix_file.fix_embedding(f.path, _text_model(a), a.class_word, a.out, a.rotation, a.scale,
                                        a.method, a.force)
        print(result.to_text())
        return result
    p.set_defaults(run=run)


def _add_study(sub: Any) -> None:
    p = sub.add_parser("study", help="the TEA study of a concept folder: shift tracker, impacts, with/without TEA",
                       description=concept_study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", help="the concept folder (with concept.json)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS} (default: every run)")
    p.add_argument("--probes", type=int, default=12, help="contextual prompts")
    p.add_argument("--repeats", type=int, default=1, help="images per prompt")
    p.add_argument("--every", type=int, default=500, help="snapshot spacing of the image-space study")
    _add_grid_options(p)

    def study(a: argparse.Namespace) -> Any:
        code = _relaunch(a)
        if code is not None:
            return code
        _threads(a.threads)
        concept = read_concept(a.concept)
        check_write(Path(concept.folder) / concept_study.STUDY_DIR)  # a study/ that leads out fails before any model loads
        if shards.process_state().is_main_process:
            print(format_paths(concept))
        state, pipe, clip, dino, oracle = _grid_models(a, concept.model)
        settings = concept_study.StudySettings(a.probes, a.repeats, a.every, a.steps, a.guidance, a.batch_size)
        methods = [check_method(m) for m in a.methods.split(",")] if a.methods else None
        out = concept_study.study_concept(concept.folder, pipe, clip, dino, oracle, settings, methods,
                                          progress=not a.no_progress, state=state)
        if out is None:  # not the main process: the main one gathers and writes
            return None
        print(f"wrote {Path(concept.folder) / concept_study.STUDY_DIR / 'study.json'} and {len(out['figures'])} figures")
        return out
    p.set_defaults(run=study)


def _add_processes(p: Any) -> None:
    p.add_argument("--processes", type=int, default=1,
                   help="processes to shard the grid over (accelerate launches them; one per GPU, or CPU processes "
                        "over gloo); `accelerate launch -m persviz ...` works too")


def _relaunch(a: argparse.Namespace) -> int | None:
    """With --processes N > 1 outside a launch: the same command again in N processes through accelerate, its exit
    code; None when this process is the one to run (one process, or already launched)."""
    if a.processes < 1:
        raise SystemExit(f"persviz {a.command}: --processes must be at least 1; got {a.processes}")
    if a.processes == 1 or shards.launched():
        return None
    code = shards.relaunch(shards.strip_option(a.argv, "--processes"), a.processes, a.threads)
    if code:
        raise SystemExit(f"persviz {a.command}: a process of the {a.processes} failed (exit {code}); the cells written "
                         "so far are kept, run the same command again to resume")
    return code


def _process_device(state: Any) -> str | None:
    """This process's GPU when launched on several GPUs (each process its own), else the default device."""
    return str(state.device) if state.device.type == "cuda" else None


def _add_grid_options(p: Any, dino: bool = True) -> None:
    """The options of every sharded grid command: sampler, judges, processes, threads, progress."""
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 25 ShapesWorld, 50 SD 1.5)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: 4 ShapesWorld, 7 SD 1.5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip", default=None, help="CLIP evaluator (default: the scale's)")
    if dino:
        p.add_argument("--dino", default=None, help="DINO evaluator (default: the scale's)")
    _add_processes(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per process)")
    p.add_argument("--no-progress", action="store_true")


def _grid_models(a: argparse.Namespace, model: str, judges: tuple[str, ...] = ("clip", "dino", "oracle")) -> tuple:
    """(process state, pipeline, clip, dino, oracle) of a sharded grid command on this process's device: the
    model's pipeline (SD 1.x checked; at full scale the VAE decodes one image at a time) and the scale's judges
    (None for those not asked; the oracle on ShapesWorld only)."""
    state = shards.process_state()
    device = _process_device(state)
    small = str(model) == SHAPESWORLD
    pipe = load_pipeline(None if small else model, device=device)
    concept_runs.check_sd1(pipe, model)
    if not small:
        pipe.vae.enable_slicing()  # decode one image at a time: 512 px batches fit a small GPU
    clip = load_evaluator(a.clip or (None if small else FULL_DEFAULTS["clip"]), kind="clip", device=device)
    dino = (load_evaluator(a.dino or (None if small else FULL_DEFAULTS["dino"]), kind="dino", device=device)
            if "dino" in judges else None)
    oracle = load_evaluator(kind="oracle", device=device) if small and "oracle" in judges else None
    return state, pipe, clip, dino, oracle


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help="token-level TEA over rotation x scale on a concept's Textual Inversion run, "
                       "every image scored; sharded, resumable", description=tea_sweep.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", help="the concept folder (with a Textual Inversion run)")
    p.add_argument("--rotations", type=_floats, default=(0.0, 0.2, 0.4), help="comma-separated, in [0, 1]")
    p.add_argument("--scales", type=_floats, default=(0.0, 0.5, 1.0), help="comma-separated, in [0, 1]")
    p.add_argument("--prompts", type=int, default=48, help="contextual prompts")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="first generation seed")
    p.add_argument("--chunk", type=int, default=None, help="prompts per cell (default: all prompts in one cell)")
    p.add_argument("--out", required=True, help="results folder: cells/, manifest.json, sweep.json")
    _add_grid_options(p)

    def sweep(a: argparse.Namespace) -> Any:
        code = _relaunch(a)
        if code is not None:
            return code
        _threads(a.threads)
        tea_sweep.sweep_cells(a.rotations, a.scales, a.prompts, a.chunk)  # bad knobs fail before any model loads
        concept = read_concept(a.concept)
        small = concept.model == SHAPESWORLD
        state, pipe, clip, dino, oracle = _grid_models(a, concept.model)
        gen = concept_study.StudySettings(steps=a.steps, guidance=a.guidance, batch_size=a.batch_size).generation(small)
        ev = tea_sweep.run_sweep(concept.folder, pipe, clip, dino, oracle, a.rotations, a.scales, a.prompts, a.seeds,
                                 a.out, a.seed, a.chunk, gen["steps"], gen["guidance"], gen["batch_size"], state,
                                 progress=not a.no_progress)
        if ev is not None:
            print(f"wrote {Path(a.out) / tea_sweep.SWEEP_JSON}: {len(ev.conditions)} conditions x "
                  f"{a.prompts} prompts x {a.seeds} seeds ({state.num_processes} process(es))")
        return ev
    p.set_defaults(run=sweep)


def _add_doctor(sub: Any) -> None:
    p = sub.add_parser("doctor", help="versions, device, which full-scale Hub models are cached, what to download",
                       description=doctor.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("concept", nargs="?", default=None,
                   help="a concept folder whose recorded paths to show (default: PERSVIZ_CONCEPT, if set)")

    def run(a: argparse.Namespace) -> int:
        report = doctor.diagnose()
        folders = [a.concept] if a.concept else [c for c in os.environ.get("PERSVIZ_CONCEPT", "").split(",") if c]
        concepts = [read_concept(f) for f in folders]
        if a.json:
            report = {**report, "concepts": {str(c.folder): concept_paths(c) for c in concepts}}
            print(json.dumps(report, indent=2))
        else:
            print(doctor.format_report(report))
            for c in concepts:
                print(format_paths(c))
        return 0
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``persviz`` parser with every subcommand."""
    ap = argparse.ArgumentParser(prog="persviz", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _add_notebooks(sub)
    _add_train(sub)
    _add_adopt(sub)
    _add_study(sub)
    _add_sweep(sub)
    _add_shapesworld(sub)
    _add_tea(sub)
    _add_finexl(sub)
    _add_pigeon(sub)
    _add_inspect(sub)
    _add_fix(sub)
    _add_doctor(sub)
    return ap


DEBUG_ENV = "PERSVIZ_DEBUG"
INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)


def _write_root(a: argparse.Namespace) -> Path | None:
    """The folder the command was given to write in (a concept folder, a results folder), or None: every write of
    the command must resolve inside it (persviz.io.confined)."""
    if a.command in ("train", "adopt", "sweep", "notebooks") or (a.command == "finexl" and a.action == "explain"):
        return Path(a.out)
    if a.command == "study":
        return Path(a.concept)
    if a.command == "fix":
        return Path(a.out).expanduser().absolute().parent
    return None


def _run(args: argparse.Namespace) -> Any:
    root = _write_root(args)
    if root is None:
        return args.run(args)
    root = root.expanduser()
    if root.exists() and not root.is_dir():
        raise PersvizError(f"{root} is a file, not a folder; name a folder (a new one is created)")
    with confined(root):
        return args.run(args)


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``persviz`` console script: runs the subcommand; an integer result is the exit code.

    Every error ends the command with one line naming the problem and the fix (persviz.errors.describe), without
    colour codes; ``--debug`` (anywhere on the line) or PERSVIZ_DEBUG=1 shows the traceback instead. Ctrl-C says
    where training stopped and exits 130."""
    raw = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in raw or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    args = build_parser().parse_args([a for a in raw if a != "--debug"])
    args.argv = raw  # what a --processes N run launches again
    try:
        result = _run(args)
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"persviz {args.command}: " + (one_line(str(e)) if isinstance(e, TrainingInterrupted) else
                                             "interrupted (Ctrl-C); run the same command again to go on"),
              file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except Exception as e:
        if debug:
            raise
        raise SystemExit(f"persviz {args.command}: {describe(e)}") from None
    if argv is None:  # the console script: sys.exit(main()) takes an exit code, never a result object
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    return result


if __name__ == "__main__":
    main()
