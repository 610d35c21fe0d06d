"""The TEA findings (i)-(iv) of docs/findings.md, computed from what the shipped runs store: each Textual Inversion
run's study.json (the tracker over snapshots) and the tea table (per-image scores with and without TEA and of the
base model with the class word). The criteria are the registered ones; nothing here is tuned to the results.

    studies = {name: load_json(run_dir("textual_inversion", name) / "study.json") for name in CONCEPTS}
    table = read_tea_table()
    for f in all_findings(studies, table, vocabulary_norms(pipe)): print(f.key, f.holds, f.summary)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from persviz.constants import CLASS_WORD_ROW
from persviz.evaluation import Evaluation, combine
from persviz.metrics import spearman
from persviz.stats import N_BOOT, Difference
from persviz.families import text_stack
from persviz.methods import METHODS, get_method
from persviz.shapesworld.concepts import CONCEPTS, LEARNED_BY
from persviz.tea.inspect_file import TAIL, vocabulary
from persviz.tea.shapesworld_runs import read_tea_table, run_dir
from persviz.tea.tracker import load_json

NORM_RHO, SHIFT_RHO = 0.8, 0.5  # the registered rank-correlation thresholds of (i) and (ii)


@dataclass(frozen=True)
class Finding:
    """One registered finding: whether it holds (None: not measurable here), per concept or method, and why."""

    key: str
    title: str
    holds: Optional[bool]
    parts: dict = field(default_factory=dict)  # per concept (i-iii) or method (iv): {'holds': bool, ...numbers}
    summary: str = ""


def _at(track: Mapping[str, Sequence], key: str, step: int) -> float:
    steps = list(track["step"])
    return float(track[key][steps.index(step)])


def percentile_of(value: float, norms: np.ndarray) -> float:
    """Share of the vocabulary's row norms (in %) smaller than value."""
    return float(100.0 * np.mean(np.asarray(norms, dtype=np.float64) < value))


def vocabulary_norms(pipe: Any) -> np.ndarray:
    """The row norms of the pipeline's (first) text encoder's own vocabulary (no added tokens)."""
    enc = text_stack(pipe).primary
    _, rows = vocabulary(enc.tokenizer, enc.encoder)
    return rows.norm(dim=-1).numpy()


def norm_drift(track: Mapping[str, Sequence], vocab_norms: np.ndarray, first: int = 100,
               last: int = 3000) -> dict:
    """Finding (i) for one run: |V*|/|c| and cos(V*, c) at the first and last snapshot, rho(step, |V*|), the
    percentile of |V*| among the vocabulary's norms at the last step, and whether all four criteria hold."""
    steps = [s for s in track["step"] if s >= first]
    norms = [float(track["vstar_norm"][list(track["step"]).index(s)]) for s in steps]
    out = {"norm_ratio": [_at(track, "norm_ratio", first), _at(track, "norm_ratio", last)],
           "cosine": [_at(track, "cosine", first), _at(track, "cosine", last)],
           "rho_norm": spearman(steps, norms), "percentile": percentile_of(_at(track, "vstar_norm", last), vocab_norms)}
    out["holds"] = bool(out["norm_ratio"][1] > out["norm_ratio"][0] and out["rho_norm"] >= NORM_RHO
                        and out["cosine"][1] < out["cosine"][0] and out["percentile"] > TAIL)
    return out


def text_collapse(track: Mapping[str, Sequence], first: int = 100, last: int = 3000) -> dict:
    """Finding (ii) for one run: inter-set L2 and Mahalanobis up (rho >= 0.5), intra-set spread of P_V* down
    (rho <= -0.5), each from the first to the last snapshot."""
    steps = [s for s in track["step"] if s >= first]
    out: dict[str, Any] = {}
    for kind, sign in (("inter", 1), ("intra_vstar", -1)):
        for metric in ("l2", "mahalanobis"):
            key = f"{kind}_{metric}"
            vals = [float(track[key][list(track["step"]).index(s)]) for s in steps]
            rho = spearman(steps, vals)
            moved = (vals[-1] - vals[0]) * sign > 0
            out[key] = {"first": vals[0], "last": vals[-1], "rho": rho,
                        "holds": bool(moved and rho * sign >= SHIFT_RHO)}
    out["holds"] = all(v["holds"] for v in out.values() if isinstance(v, dict))
    return out


def _diff(ev: Evaluation, a: str, b: str, metrics: Sequence[str], n_boot: int) -> dict[str, Difference]:
    return ev.compare(a, b, [m for m in metrics if m in ev.metrics(a) and m in ev.metrics(b)], n_boot=n_boot)


def context_vs_concept(evaluations: Mapping[str, Evaluation], method: str = "textual_inversion",
                       n_boot: int = N_BOOT) -> dict:
    """Finding (iii): '<method> - class word' on the oracle's concept and context rates (and CLIP-T of the context
    part), over the given concepts pooled; holds when the concept difference is above 0 and the context one below."""
    metrics = ("oracle_concept", "oracle_context", "clip_t_context")
    d = _diff(combine(evaluations), CLASS_WORD_ROW, method, metrics, n_boot)
    holds = d["oracle_concept"].low > 0 and d["oracle_context"].high < 0
    return {"differences": d, "holds": bool(holds),
            "clip_agrees": bool(np.sign(d["clip_t_context"].mean) == np.sign(d["oracle_context"].mean))}


def tea_recovery(evaluations: Mapping[str, Evaluation], method: str, n_boot: int = N_BOOT) -> dict:
    """Finding (iv) for one method: '<method> TEA - <method>' on the oracle's context rate (holds when above 0) and
    the cost: the oracle's concept rate, DINO-I and CLIP-I."""
    d = _diff(combine(evaluations), method, f"{method} TEA",
              ("oracle_context", "oracle_concept", "dino_i", "clip_i", "clip_t_context"), n_boot)
    return {"differences": d, "holds": bool(d["oracle_context"].low > 0)}


def _direction(first: float, last: float, flat: float) -> str:
    return "rises" if last - first > flat else "falls" if first - last > flat else "stays flat"


def trend_title(subject: str, table: Mapping[str, Sequence[float]], flat: float = 0.05, clip_flat: float = 2.0) -> str:
    """A figure title that says what the ground truth shows from the first to the last step of an impacts table
    (impacts_over_steps): the oracle's concept and context rates (a change within `flat` is "flat"), CLIP-T of
    the context beside it (within `clip_flat` points: flat), and that the two judges disagree when one moves the
    context and the other does not, or they move it in opposite directions."""
    head = f"{subject}: "  # two lines: the ground truth, then CLIP
    ct = table.get("clip_t_context")
    clip = f"CLIP-T context {ct[0]:.0f}→{ct[-1]:.0f}" if ct is not None and len(ct) else ""
    oc, ox = table.get("oracle_concept"), table.get("oracle_context")
    if oc is None or ox is None or not len(oc):
        return head + (clip or "no score") + " (no ground truth at this scale)"
    concept, context = _direction(oc[0], oc[-1], flat), _direction(ox[0], ox[-1], flat)
    verdict = (f"by the oracle the concept {concept} ({oc[0]:.2f}→{oc[-1]:.2f}) and the context {context} "
               f"({ox[0]:.2f}→{ox[-1]:.2f})")
    if clip:
        clip_dir = _direction(ct[0], ct[-1], clip_flat)
        disagree = clip_dir != context
        verdict += f"\n{clip}" + (" (CLIP and the oracle disagree)" if disagree else "")
    return head + verdict


def dominance_title(steps: Sequence[int], fixed: Sequence[float], varied: Sequence[float], fixed_label: str,
                    varied_label: str) -> str:
    """A title for the multi-concept figure that says what the curves show: whether the varied concept's CLIP-I
    overtakes the fixed one's as it trains, and from which step."""
    over = [s for s, a, b in zip(steps, fixed, varied) if b > a]
    if not over:
        return f"{fixed_label} (fixed) stays above {varied_label} (varied) at every step: no takeover"
    if over == [s for s in steps if s >= over[0]]:
        return f"{varied_label} (varied) overtakes {fixed_label} (fixed) from step {over[0]}"
    return f"{varied_label} (varied) is above {fixed_label} (fixed) at steps {', '.join(map(str, over))} only"


def _interval(d: Difference, digits: int = 3) -> str:
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def all_findings(studies: Mapping[str, Mapping], table: Mapping, vocab_norms: np.ndarray,
                 learned: Optional[Sequence[str]] = None, methods: Sequence[str] = (), n_boot: int = N_BOOT
                 ) -> list[Finding]:
    """Findings (i)-(iv) as registered: (i)-(ii) per concept from its study.json's tracker; (iii) pooled over the
    concepts in `learned` (those whose personalization met the target; default all) and per concept; (iv) per
    method of `methods` (default: every method with a TEA row in the table)."""
    evs: Mapping[str, Evaluation] = table["evaluations"]
    learned = list(learned if learned is not None else evs)
    out = []
    drift = {n: norm_drift(s["text"], vocab_norms) for n, s in studies.items()}
    out.append(Finding("i", "norm drift", all(v["holds"] for v in drift.values()), drift,
                       "; ".join(f"{n}: |V*|/|c| {v['norm_ratio'][0]:.2f}→{v['norm_ratio'][1]:.2f}, cos "
                                 f"{v['cosine'][0]:.2f}→{v['cosine'][1]:.2f}, percentile {v['percentile']:.1f}"
                                 for n, v in drift.items())))
    shift = {n: text_collapse(s["text"]) for n, s in studies.items()}
    out.append(Finding("ii", "inter-set distance up, intra-set spread down", all(v["holds"] for v in shift.values()),
                       shift, "; ".join(f"{n}: inter L2 {v['inter_l2']['first']:.1f}→{v['inter_l2']['last']:.1f}, "
                                        f"intra L2 {v['intra_vstar_l2']['first']:.1f}→{v['intra_vstar_l2']['last']:.1f}"
                                        for n, v in shift.items())))
    per = {n: context_vs_concept({n: evs[n]}, n_boot=n_boot) for n in evs}
    pooled = context_vs_concept({n: evs[n] for n in learned}, n_boot=n_boot)
    d = pooled["differences"]
    out.append(Finding("iii", "context falls as the concept rises (oracle)", pooled["holds"],
                       {"pooled": pooled, **per},
                       f"concept {_interval(d['oracle_concept'])}, context {_interval(d['oracle_context'])} "
                       f"(concepts {', '.join(learned)}); CLIP-T context {_interval(d['clip_t_context'], 1)}"
                       + ("" if pooled["clip_agrees"] else ": CLIP and the oracle disagree")))
    names = list(methods) or [c[:-4] for c in next(iter(evs.values())).conditions if c.endswith(" TEA")]
    rec = {m: tea_recovery(evs, m, n_boot) for m in names}
    out.append(Finding("iv", "TEA recovers context", all(v["holds"] for v in rec.values()), rec,
                       "; ".join(f"{m}: context {_interval(v['differences']['oracle_context'])}, concept "
                                 f"{_interval(v['differences']['oracle_concept'])}, DINO-I "
                                 f"{_interval(v['differences']['dino_i'])}" for m, v in rec.items())))
    return out


def findings_markdown(findings: Sequence[Finding]) -> str:
    """The findings as a markdown table: key, finding, status (holds / fails / not measured) and its numbers."""
    status = {True: "holds", False: "**fails**", None: "not measured"}
    lines = ["| finding | what | status | numbers |", "| --- | --- | --- | --- |"]
    lines += [f"| ({f.key}) | {f.title} | {status[f.holds]} | {f.summary} |" for f in findings]
    return "\n".join(lines)


def shipped_findings(pipe: Any, n_boot: int = N_BOOT) -> list[Finding]:
    """Findings (i)-(iv) of the shipped ShapesWorld runs: each concept's Textual Inversion study.json and the tea
    table; (iii) pools the concepts whose Textual Inversion met the personalization target (docs/world.md)."""
    studied = next(m for m in METHODS if get_method(m).row_snapshots)  # the method whose runs keep every row
    studies = {n: load_json(run_dir(studied, n) / "study.json") for n in CONCEPTS}
    learned = [n for n in CONCEPTS if studied in LEARNED_BY[n]]
    return all_findings(studies, read_tea_table(), vocabulary_norms(pipe), learned, n_boot=n_boot)


__all__ = ["findings_markdown", "shipped_findings", "CLASS_WORD_ROW", "Finding", "all_findings", "context_vs_concept", "norm_drift", "percentile_of",
           "tea_recovery", "text_collapse", "trend_title", "vocabulary_norms", "dominance_title"]
