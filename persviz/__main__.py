"""``python -m persviz``: the same as the ``persviz`` console script."""
from persviz.cli import main

main()
