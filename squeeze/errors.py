"""The one exception type for mistakes a user can fix, and its option-naming form."""

from __future__ import annotations

from collections.abc import Callable


class SqueezeError(Exception):
    """A user error: bad input, missing model, impossible option.

    The message is one line the user can act on; the CLI prints it in red and
    exits with code 2. Bugs raise ordinary exceptions with tracebacks.
    """


def python_spelling(option: str) -> str:
    """How a Python caller names an option: the keyword argument itself."""
    return option


def cli_spelling(option: str) -> str:
    """How the command line names an option: ``damp_percent`` → ``--damp-percent``."""
    return "--" + option.replace("_", "-")


def recipe_spelling(option: str) -> str:
    """How a recipe names an option: ``damp_percent`` → ``damp_percent:``."""
    return option + ":"


class OptionError(SqueezeError):
    """A user error about named options, worded so that each caller names them in its own words.

    ``template`` holds ``{0}``, ``{1}``, ... where the options go; ``options`` are their Python
    names (``smooth_fallback``). ``str(error)`` spells them as a Python caller would; the CLI
    re-renders with :func:`cli_spelling` (``--smooth-fallback``), a recipe with
    :func:`recipe_spelling` (``smooth_fallback:``).
    """

    def __init__(self, template: str, *options: str) -> None:
        self.template = template
        self.options = options
        super().__init__(self.render(python_spelling))

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with every option spelt by ``spell``."""
        return self.template.format(*(spell(option) for option in self.options))


def in_words(error: SqueezeError, spell: Callable[[str], str]) -> str:
    """The message of ``error`` for a caller that spells options with ``spell``."""
    return error.render(spell) if isinstance(error, OptionError) else str(error)


def literal(text: object) -> str:
    """``text`` made safe to put inside an OptionError template: its braces doubled."""
    return str(text).replace("{", "{{").replace("}", "}}")
