"""``python -m persviz``: the same as the ``persviz`` console script."""
import sys

from persviz.cli import main

sys.exit(main())
