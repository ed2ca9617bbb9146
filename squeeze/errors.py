"""The one exception type for mistakes a user can fix."""


class SqueezeError(Exception):
    """A user error: bad input, missing model, impossible option.

    The message is one line the user can act on; the CLI prints it in red and
    exits with code 2. Bugs raise ordinary exceptions with tracebacks.
    """
