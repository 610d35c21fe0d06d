"""persviz: see how a text-to-image model was personalized.

Three rooms over one floor: ``persviz.tea`` (semantic collapse, test-time embedding adjustment), ``persviz.finexl``
(explanations in natural language), ``persviz.pigeon`` (personalization from a noisy history); the floor holds the
loaders, evaluators, metrics, trainers and ShapesWorld. The ``persviz`` command (``persviz.cli``) is the door.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("persviz")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.2.0"
