"""The door's subcommands, one module per group (``persviz.cli.GROUPS`` lists them in the order of ``persviz --help``).

Each module has ``add_parser(sub)``, which adds its subcommands to the ``persviz`` parser with light imports only
(the standard library, ``persviz.constants``, ``persviz.paths``, ``persviz.commands.common``: help texts are the
library's docstrings read from the source files), and one function per subcommand that imports the library modules
it runs when it runs: ``persviz --help`` and ``persviz CMD --help`` import no torch (tests/door/test_fast_cli.py),
and each command loads only what it uses. Like ``persviz.cli``, nothing in the library imports these modules.
"""
