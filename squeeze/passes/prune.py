"""The prune pass."""

from squeeze.api import prune  # temporary: the lead moves the body here

__all__ = ["prune"]
