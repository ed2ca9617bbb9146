"""The quantization methods by name: one file each in this package, one entry each in the import below.

Importing a method's module registers it (``@METHODS.register``); the order here is the order of
the ``--method`` choices.
"""

from __future__ import annotations

from squeeze.quant.methods import rtn, gptq, smoothquant, awq, hqq, autoround  # noqa: F401  (one module per method)
from squeeze.quant.methods.base import METHODS, QuantMethod

__all__ = ["METHODS", "QuantMethod"]
