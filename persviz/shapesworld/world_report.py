"""The concept table of issue 23: for each concept and method, how often the oracle finds the concept, on plain
prompts (the world search's round-2 held-out cells, docs/world.md §6) and on the tea table's contextual prompts,
with intervals, beside the class word alone (the control).

    python -m persviz.shapesworld.world_report          # prints the markdown table (docs/world.md §7)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from persviz.constants import CLASS_WORD_ROW
from persviz.evaluation import Evaluation
from persviz.methods import METHODS
from persviz.shapesworld.concept_checks import wilson
from persviz.shapesworld.concepts import CONCEPTS, CONCEPTS_DIR
from persviz.shapesworld.world_search import CHECKS_DIR, RESULTS_JSON, TARGET_LOW, TARGET_RATE, read_cells
from persviz.stats import bootstrap_mean



def plain_rates(out: Path = RESULTS_JSON, seed_set: str = "held_out2",
                checks: Path = CHECKS_DIR / "concept_checks.json") -> dict[tuple[str, str], dict]:
    """{(method, concept): the rate summary of its round-2 held-out cell, with lr and step}, and the class word
    alone on the same plain prompts (the checks' control, seeds 0-7) under (CLASS_WORD_ROW, concept)."""
    out_rates = {(c["method"], c["concept"]): {**c["rate"], "lr": c["lr"], "step": c["step"],
                                               "boot": [c["rate"]["boot_low"], c["rate"]["boot_high"]],
                                               "wilson": [c["rate"]["wilson_low"], c["rate"]["wilson_high"]]}
                 for c in read_cells(out) if c["seed_set"] == seed_set}
    if Path(checks).is_file():
        for name, c in json.loads(Path(checks).read_text()).items():
            r = c["class_word_rate"]
            out_rates[(CLASS_WORD_ROW, name)] = {**r, "boot": [r["boot_low"], r["boot_high"]],
                                                 "wilson": [r["wilson_low"], r["wilson_high"]]}
    return out_rates


def contextual_rate(ev: Evaluation, row: str) -> dict:
    """The oracle's concept rate of one tea-table row on one concept: mean over prompts (seeds nested) with the
    bootstrap interval, and Wilson's over the images."""
    _, groups, _ = ev.grouped(row, "oracle_concept")
    iv = bootstrap_mean(groups)
    k, n = int(sum(g.sum() for g in groups)), int(sum(g.size for g in groups))
    lo, hi = wilson(k, n)
    return {"rate": iv.mean, "k": k, "n": n, "boot": [iv.low, iv.high], "wilson": [lo, hi],
            "low": min(iv.low, lo)}


def concept_table(methods: Sequence[str], search: Path = RESULTS_JSON,
                  tea_table: Path = CONCEPTS_DIR / "tea_table.json",
                  before: Optional[Mapping[str, Mapping[str, float]]] = None) -> list[dict[str, Any]]:
    """One row per (concept, method), and one per concept for the class word: plain-prompt and contextual rates
    with intervals, whether the plain rate meets the target, and (`before`: {row: {concept: rate}}) the
    contextual rate of the two-color concepts this replaced."""
    plain = plain_rates(search)
    evs = {k: Evaluation.from_json(v) for k, v in json.loads(Path(tea_table).read_text())["evaluations"].items()}
    rows = []
    for name in CONCEPTS:
        for method in [*methods, CLASS_WORD_ROW]:
            p = plain.get((method, name))
            ctx = contextual_rate(evs[name], method) if method in evs[name].items else None
            meets = None if p is None or method == CLASS_WORD_ROW else bool(p["rate"] >= TARGET_RATE
                                                                              and p["low"] >= TARGET_LOW)
            rows.append({"concept": name, "method": method, "plain": p, "contextual": ctx, "meets": meets,
                         "before": None if before is None else before.get(method, {}).get(name)})
    return rows


def _fmt(r: Optional[Mapping]) -> str:
    if r is None:
        return "—"
    lo = min(r["boot"][0], r["wilson"][0]) if "boot" in r else r.get("low", float("nan"))
    return f"{r['rate']:.2f} ({r['k']}/{r['n']}; low {lo:.2f})"


def concept_table_markdown(rows: Sequence[Mapping]) -> str:
    """concept_table as markdown: concept, method (recipe), plain rate, verdict, contextual rate, before."""
    out = ["| concept | method (lr, steps) | plain prompts, round-2 seeds | target | contextual prompts (tea table) "
           "| contextual, two-color concept before |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["plain"]
        recipe = f" ({p['lr']:g}, {p['step']})" if p and "lr" in p else ""
        verdict = {True: "meets", False: "**misses**", None: "—"}[r["meets"]]
        before = "—" if r["before"] is None else f"{r['before']:.2f}"
        out.append(f"| {r['concept']} | {r['method']}{recipe} | {_fmt(p)} | {verdict} | {_fmt(r['contextual'])} | "
                   f"{before} |")
    return "\n".join(out)


def before_rates(old_tea_table: Path) -> dict[str, dict[str, float]]:
    """{row: {concept: oracle concept rate}} of an older tea_table.json (its 'per_concept' means)."""
    per = json.loads(Path(old_tea_table).read_text())["per_concept"]
    return {row: {c: v["oracle_concept"] for c, v in by.items()} for row, by in per.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Prints the concept table of the shipped runs (docs/world.md §7); --before OLD_TEA_TABLE adds a column."""
    ap = argparse.ArgumentParser(prog="python -m persviz.shapesworld.world_report")
    ap.add_argument("--before", default=None, help="an older tea_table.json (e.g. persviz 0.2's, from git)")
    a = ap.parse_args(argv)
    print(concept_table_markdown(concept_table(METHODS, before=before_rates(Path(a.before)) if a.before else None)))


if __name__ == "__main__":
    main()


__all__ = ["CLASS_WORD_ROW", "before_rates", "concept_table", "concept_table_markdown", "contextual_rate", "plain_rates"]
