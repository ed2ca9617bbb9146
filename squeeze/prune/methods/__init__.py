"""The pruning methods by name: one file each in this package, one entry each in the import below.

Importing a method's module registers it (``@PRUNE_METHODS.register``); the order here is the order
of the ``--method`` choices.
"""

from __future__ import annotations

from squeeze.prune.methods import magnitude, wanda, sparsegpt  # noqa: F401  (one module per method)
from squeeze.prune.methods.base import PRUNE_METHODS, PruneMethod

__all__ = ["PRUNE_METHODS", "PruneMethod"]
