"""Results as tables: one object that prints as aligned text and shows as HTML or markdown in a notebook.

    table({"ti": {"clip_i": 71.2, "dino_i": 0.41}, "ti TEA": {...}}, ["clip_i", "dino_i"])
    table(rows_as_dicts, {"noise_rate": "noise rate", "auc": "AUC"}, formats={"noise_rate": ".1f"})

No pandas: a `Table` holds the formatted cells; ``to_markdown()`` gives a GitHub table, ``_repr_html_`` and
``_repr_markdown_`` let Jupyter render it, ``str()`` aligns plain text.
"""
from __future__ import annotations

import html
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

Columns = Union[Sequence[str], Mapping[str, str], None]


@dataclass(frozen=True)
class Table:
    """Formatted cells: `header` (labels) and `cells` (rows of strings); numeric columns align right."""

    header: tuple[str, ...]
    cells: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]
    title: Optional[str] = None

    def to_markdown(self) -> str:
        """A GitHub markdown table (with the title as a bold line above it, when there is one)."""
        esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
        lines = [f"**{esc(self.title)}**", ""] if self.title else []
        lines.append("| " + " | ".join(esc(h) for h in self.header) + " |")
        lines.append("|" + "|".join("---:" if num else ":---" for num in self.numeric) + "|")
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.cells]
        return "\n".join(lines)

    def to_text(self) -> str:
        """Plain text with aligned columns."""
        widths = [max([len(h)] + [len(r[j]) for r in self.cells]) for j, h in enumerate(self.header)]
        fit = lambda s, j: s.rjust(widths[j]) if self.numeric[j] else s.ljust(widths[j])
        lines = [self.title] if self.title else []
        lines.append("  ".join(fit(h, j) for j, h in enumerate(self.header)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(fit(c, j) for j, c in enumerate(row)).rstrip() for row in self.cells]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def _repr_html_(self) -> str:
        align = lambda j: "right" if self.numeric[j] else "left"
        head = "".join(f'<th style="text-align:{align(j)}">{html.escape(h)}</th>' for j, h in enumerate(self.header))
        body = "".join("<tr>" + "".join(f'<td style="text-align:{align(j)}">{html.escape(c)}</td>'
                                        for j, c in enumerate(row)) + "</tr>" for row in self.cells)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text()

    def __len__(self) -> int:
        return len(self.cells)


def format_value(value: Any, spec: Optional[str] = None, floats: str = ".3f") -> str:
    """One cell: None as '-', ints as they are, other numbers with `spec` (default `floats`), the rest as str."""
    if value is None:
        return "-"
    if spec is not None and isinstance(value, numbers.Number) and not isinstance(value, bool):
        return format(value, spec)
    if isinstance(value, bool) or isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return format(float(value), floats)
    return str(value)


def table(rows: Union[Sequence[Mapping[str, Any]], Mapping[str, Mapping[str, Any]]], columns: Columns = None,
          formats: Optional[Mapping[str, str]] = None, floats: str = ".3f", index: Optional[str] = "",
          title: Optional[str] = None) -> Table:
    """A result as a table.

    rows: a list of row mappings, or a mapping {row label: row mapping} whose labels become the first column
        (headed `index`; `index=None` leaves the labels out).
    columns: the keys to show, in order (a list), or {key: header label}; None: every key of the first row.
    formats: format specs by key (e.g. {'step': 'd', 'auc': '.2f'}); other floats use `floats`, ints stay ints.
    A key missing from a row shows as '-'."""
    labelled = isinstance(rows, Mapping)
    items = list(rows.items()) if labelled else [(None, r) for r in rows]
    if columns is None:
        if not items:
            raise ValueError("no rows and no columns: nothing to show")
        columns = list(items[0][1])
    labels = dict(columns) if isinstance(columns, Mapping) else {k: k for k in columns}
    if not labels:
        raise ValueError("no columns to show")
    formats = dict(formats or {})
    unknown = sorted(set(formats) - set(labels))
    if unknown:
        raise ValueError(f"formats for columns not shown: {unknown}")
    keys = list(labels)
    cells, numeric = [], [True] * len(keys)
    for _, row in items:
        values = [row.get(k) for k in keys]
        for j, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Number)):
                numeric[j] = False
        cells.append([format_value(v, formats.get(k), floats) for k, v in zip(keys, values)])
    header = [labels[k] for k in keys]
    if labelled and index is not None:
        header = [index] + header
        numeric = [False] + numeric
        cells = [[str(label)] + row for (label, _), row in zip(items, cells)]
    return Table(tuple(header), tuple(tuple(r) for r in cells), tuple(numeric), title)


def differences_text(diffs: Mapping[str, Mapping[str, Any]], metrics: Optional[Sequence[str]] = None,
                     labels: Optional[Mapping[str, str]] = None, alpha: float = 0.05) -> str:
    """What paired differences say, one line per comparison: each metric's mean [95 % interval] and whether it
    holds (interval clear of 0 and Holm p < alpha) or is within noise. `diffs`: {comparison: {metric: Difference}}
    (persviz.stats; anything with mean, low, high and p_holm)."""
    labels = labels or {}
    lines = []
    for name, by in diffs.items():
        parts = []
        for m in [m for m in (metrics or by) if m in by]:
            d = by[m]
            real = (d.low > 0 or d.high < 0) and d.p_holm < alpha
            parts.append(f"{labels.get(m, m)} {d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}]"
                         + (f" holds (Holm p {d.p_holm:.2g})" if real else " within noise"))
        lines.append(f"{name}: " + "; ".join(parts))
    return "\n".join(lines)


__all__ = ["Table", "differences_text", "format_value", "table"]
