"""The ``squeeze`` command line: parse options, build a config, call the API, print.

Each command module registers its commands on the one Typer ``app`` when imported, in the order
``squeeze --help`` lists them.
"""

from squeeze.cli import passes  # noqa: F401  quantize, prune, distill
from squeeze.cli import inspect  # noqa: F401  inspect
from squeeze.cli import run  # noqa: F401  run, report, bench
from squeeze.cli import infer  # noqa: F401  bench-infer, eval, generate
from squeeze.cli.app import app

__all__ = ["app"]
