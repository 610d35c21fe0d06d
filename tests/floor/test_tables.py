"""persviz.tables: results as text, markdown and HTML tables."""
import numpy as np
import pytest

from persviz.tables import Table, format_value, table


def test_labelled_rows_become_the_first_column_and_floats_are_formatted():
    t = table({"ti": {"clip_i": 71.25, "n": 3}, "ti TEA": {"clip_i": 69.5, "n": 4}}, ["clip_i", "n"], index="run")
    assert isinstance(t, Table) and len(t) == 2
    assert t.header == ("run", "clip_i", "n")
    assert t.cells[0] == ("ti", "71.250", "3")
    md = t.to_markdown().splitlines()
    assert md[0] == "| run | clip_i | n |" and md[1] == "|:---|---:|---:|"
    assert md[2] == "| ti | 71.250 | 3 |"
    assert t._repr_markdown_() == t.to_markdown()


def test_column_labels_formats_and_missing_values():
    rows = [{"rate": 0.2, "auc": np.float32(0.61234), "name": "a|b"}, {"rate": 0.4, "name": None}]
    t = table(rows, {"rate": "noise rate", "auc": "AUC", "name": "name"}, formats={"rate": ".1f", "auc": ".2f"})
    assert t.header == ("noise rate", "AUC", "name")
    assert t.cells == (("0.2", "0.61", "a|b"), ("0.4", "-", "-"))
    assert t.numeric == (True, True, False)
    assert "a\\|b" in t.to_markdown()  # a pipe inside a cell is escaped
    text = str(t).splitlines()
    assert text[0].startswith("noise rate") and set(text[1]) <= {"-", " "}
    assert text[2].startswith("       0.2")  # numbers align right under their header


def test_html_escapes_and_carries_the_title():
    t = table([{"k": "<b>"}], title="a & b")
    h = t._repr_html_()
    assert h.startswith("<table><caption>a &amp; b</caption>") and "&lt;b&gt;" in h and "<b>" not in h
    assert t.to_markdown().startswith("**a & b**")


def test_default_columns_index_none_and_errors():
    t = table({"x": {"a": 1, "b": 2.0}}, index=None)
    assert t.header == ("a", "b") and t.cells == (("1", "2.000"),)
    with pytest.raises(ValueError, match="nothing to show"):
        table([])
    with pytest.raises(ValueError, match="not shown"):
        table([{"a": 1}], ["a"], formats={"b": ".1f"})
    assert format_value(True) == "True" and format_value(3, ".1f") == "3.0" and format_value(None) == "-"


def test_differences_text_says_which_differences_hold():
    from persviz.stats import Difference
    from persviz.tables import differences_text
    diffs = {"ti TEA - ti": {"oracle_context": Difference(0.10, 0.03, 0.17, 24, 48, p=0.004, p_holm=0.02),
                             "clip_i": Difference(2.1, -1.1, 5.4, 24, 48, p=0.3, p_holm=1.0),
                             "dino_i": Difference(-0.05, -0.09, -0.01, 24, 48, p=0.03, p_holm=0.09)}}
    text = differences_text(diffs, ["oracle_context", "clip_i", "dino_i"], {"oracle_context": "oracle context"})
    assert text == ("ti TEA - ti: oracle context +0.1 [+0.03, +0.17] holds (Holm p 0.02); clip_i +2.1 [-1.1, +5.4] "
                    "within noise; dino_i -0.05 [-0.09, -0.01] within noise")
