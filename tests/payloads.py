"""A pickled payload for the tests that check nothing persviz loads runs code: unpickling it creates a marker file.

``torch.save({"w": Payload(marker)}, path)`` writes a file whose loading with ``weights_only=False`` (or plain
pickle) creates ``marker``; persviz must refuse it and the marker must stay absent.
"""
from __future__ import annotations

import pickle
from pathlib import Path


class Payload:
    """Unpickling calls Path.touch on the marker (any global callable would do; this one leaves evidence)."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def legacy_pickle(obj, path: Path) -> Path:
    """obj as a plain (non-zip) pickle file, the legacy format torch.load also reads."""
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)
    return Path(path)
