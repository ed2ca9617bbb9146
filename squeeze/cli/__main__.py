"""``python -m squeeze.cli``: the command line (how torchrun starts it)."""

from squeeze.cli import app

app()
