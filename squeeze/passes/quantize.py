"""The quantize pass."""

from squeeze.api import quantize  # temporary: the lead moves the body here

__all__ = ["quantize"]
