"""``persviz doctor``: versions, device, the cached Hub models and what to download (persviz.doctor)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from persviz.commands.common import doc


def add_parser(sub: Any) -> None:
    """Adds ``doctor``."""
    p = sub.add_parser("doctor", help="versions, device, which full-scale Hub models are cached, what to download",
                       description=doc("persviz.doctor"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("concept", nargs="?", default=None,
                   help="a concept folder whose recorded paths to show (default: PERSVIZ_CONCEPT, if set)")
    p.set_defaults(run=doctor)


def doctor(a: argparse.Namespace) -> int:
    """Prints the report (and the recorded paths of the concept folders); exit code 0."""
    from persviz import doctor as diagnosis
    from persviz.concept_folder import concept_paths, format_paths, read_concept
    report = diagnosis.diagnose()
    folders = [a.concept] if a.concept else [c for c in os.environ.get("PERSVIZ_CONCEPT", "").split(",") if c]
    concepts = [read_concept(f) for f in folders]
    if a.json:
        report = {**report, "concepts": {str(c.folder): concept_paths(c) for c in concepts}}
        print(json.dumps(report, indent=2))
    else:
        print(diagnosis.format_report(report))
        for c in concepts:
            print(format_paths(c))
    return 0
