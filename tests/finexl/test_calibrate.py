"""The pre-registered calibration of FineXL's LoRA variants (docs/finexl.md, "Finding (v)"): the interpolation rule
on hand-worked points, the realized level's interval against the oracle's point value, and the whole search on a
planted world whose realized level is a known function of the training rate and steps (no training, no sampling)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from persviz.finexl import calibrate as cal
from persviz.finexl.benchmark import N_PROBES, PROBE_SEED, realized_interval, realized_levels
from persviz.finexl.generators import SCENE_ASPECTS, shapesworld_probes


def test_next_rate_interpolates_between_the_bracketing_points() -> None:
    # hand-worked: 0.33 + (0.33 - 0.05) * (1 - 0.33) / (0.9 - 0.05) = 0.5507 -> 0.55
    assert cal.next_rate(0.33, [(0.0, 0.0), (0.33, 0.05), (1.0, 0.9)]) == 0.55
    # every point realizes less: the largest rate; already tried: no progress
    assert cal.next_rate(0.67, [(0.0, 0.0), (0.67, 0.42)]) == 1.0
    assert cal.next_rate(0.95, [(0.0, 0.0), (1.0, 0.8)]) is None
    # the bracket is the closest pair: (0.5, 0.2) and (0.7, 0.6) -> 0.5 + 0.13 * 0.2 / 0.4 = 0.565 -> 0.56 or 0.57
    assert cal.next_rate(0.33, [(0.0, 0.0), (0.5, 0.2), (0.7, 0.6), (1.0, 0.95)]) in (0.56, 0.57)


def test_selection_probes_are_disjoint_from_the_benchmarks() -> None:
    held, _ = shapesworld_probes(N_PROBES, seed=PROBE_SEED, p_second=0.0)
    sel = cal.selection_probes()
    assert held == cal.heldout_probes() and not set(sel) & set(held) and len(sel) > 80


def test_realized_interval_brackets_the_point_value() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((2 * 48, 4)) < 0.2
    pers = base | (rng.random((2 * 48, 4)) < np.array([0.3, 0.6, 0.0, 1.0]))
    point = realized_levels(base, pers)
    iv = realized_interval(base, pers, n_seeds=2, n_boot=500)
    for a in SCENE_ASPECTS:
        assert iv[a][0] <= point[a] + 1e-12 <= iv[a][1] + 2e-12
    assert iv["red"] == [1.0, 1.0] and iv["striped"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="seeds x probes"):
        realized_interval(base[:95], pers[:95], n_seeds=2)


class Planted:
    """A world whose LoRA at training rate p and s steps realizes (p ** 2) * min(1, s / 1800) of each aspect (the
    guidance suppresses low rates, training saturates at 1800 steps)."""

    def __init__(self) -> None:
        self.trained: list[tuple[dict, int]] = []

    @staticmethod
    def level(p: float, s: int) -> float:
        return p ** 2 * min(1.0, s / 1800)

    def trainer(self, rates, steps, run_dir: Path) -> Path:
        self.trained.append((dict(rates), int(steps)))
        run_dir.mkdir(parents=True, exist_ok=True)
        f = run_dir / "pytorch_lora_weights.safetensors"
        f.write_text(json.dumps({"rates": dict(rates), "steps": int(steps)}))
        return f

    def measure(self, f: Path) -> dict[str, float]:
        rec = json.loads(Path(f).read_text())
        return {a: self.level(rec["rates"].get(a, 0.0), rec["steps"]) for a in SCENE_ASPECTS}


def test_the_search_on_a_planted_world_meets_the_tolerance_and_resumes(tmp_path) -> None:
    world = Planted()
    c = cal.Calibration(tmp_path, trainer=world.trainer, measure=world.measure, progress=False)
    state = c.run(["striped_033", "mix_dark100_striped050"])
    # phase A: 450 -> 0.25, 900 -> 0.5, 1800 -> 1.0 >= 0.9: the first count reaching it
    assert state["steps"] == {"striped": 1800, "dark": 1800}
    assert state["ladder"]["striped"] == {"450": 0.25, "900": 0.5, "1800": 1.0}
    for name, designed in (("striped_033", {"striped": 0.33}), ("mix_dark100_striped050", {"dark": 1.0,
                                                                                           "striped": 0.5})):
        rec = state["variants"][name]
        chosen = rec["rounds"][rec["chosen"]]
        assert chosen["error"] <= cal.STOP_TOLERANCE and len(rec["rounds"]) <= cal.MAX_ROUNDS
        for a, r in designed.items():  # the planted truth: rate ~ sqrt(level)
            assert abs(world.level(chosen["rates"][a], rec["steps"]) - r) <= cal.STOP_TOLERANCE
        assert rec["rounds"][0]["rates"] == designed  # the first round trains at the designed rates
    n = len(world.trained)
    again = cal.Calibration(tmp_path, trainer=world.trainer, measure=world.measure, progress=False)
    again.run(["striped_033", "mix_dark100_striped050"])
    assert len(world.trained) == n  # resumed from state.json: nothing trained again
    shipped = again.ship(lora_dir=tmp_path / "lora")
    info = json.loads((tmp_path / "lora" / "striped_033" / "train.json").read_text())
    assert set(shipped) == {"striped_033", "mix_dark100_striped050"} and info["rates"] == {"striped": 0.33}
    assert info["training_rates"]["striped"] > 0.33 and info["steps"] == 1800
    assert json.loads(shipped["striped_033"].read_text())["rates"] == info["training_rates"]


def test_phase_a_falls_back_to_the_last_count_when_the_target_is_never_reached(tmp_path) -> None:
    world = Planted()
    slow = lambda f: {a: 0.5 * v for a, v in world.measure(f).items()}  # noqa: E731 - never reaches 0.9
    c = cal.Calibration(tmp_path, trainer=world.trainer, measure=slow, progress=False)
    assert c.steps_for("red") == cal.STEP_LADDER[-1]
    assert [s for _, s in world.trained] == list(cal.STEP_LADDER)


def test_designed_vs_realized_reads_the_benchmark_rows() -> None:
    from persviz.finexl.benchmark import designed_table, designed_vs_realized
    result = {"variants": {
        "render/dark_100": {"group": "render_single", "rates": {"dark": 1.0}},
        "lora/dark_033": {"group": "lora_single", "rates": {"dark": 0.33}, "realized": {"dark": 0.05},
                          "realized_interval": {"dark": [0.0, 0.1]}},
        "lora/mix": {"group": "lora_mixture", "rates": {"dark": 1.0, "striped": 0.5},
                     "realized": {"dark": 0.92, "striped": 0.39}}}}
    recs = designed_vs_realized(result)
    assert [(r["variant"], r["aspect"], r["within"]) for r in recs] == [
        ("lora/dark_033", "dark", False), ("lora/mix", "dark", True), ("lora/mix", "striped", False)]
    md = designed_table(result)
    assert "| lora/dark_033 | dark | 0.33 | 0.05 [0.00, 0.10] | no |" in md and "1 of 3 designed levels" in md


def test_paired_vs_naive_uses_the_same_draws() -> None:
    from persviz.finexl.benchmark import paired_vs
    rng = np.random.default_rng(1)
    naive = rng.normal(0.5, 0.1, 400)
    per_key = {"naive": {"lora_mixture/multi_aspect_error": naive.tolist()},
               "persviz": {"lora_mixture/multi_aspect_error": (naive * 0.5).tolist()}}  # always half the error
    out = paired_vs(per_key, "naive", 400)
    rec = out["persviz"]["lora_mixture/multi_aspect_error"]
    assert rec["reduction"] == [pytest.approx(0.5), pytest.approx(0.5)]  # exact per draw, so a point interval
    lo, hi = rec["difference"]
    want = np.quantile(-0.5 * naive, [0.025, 0.975])  # the intervals are rounded to 5 decimals
    assert lo == pytest.approx(want[0], abs=1e-5) and hi == pytest.approx(want[1], abs=1e-5)
