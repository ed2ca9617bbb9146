"""The pruning methods by name: one file each in this package, one entry each here."""

from __future__ import annotations

from squeeze.options import MethodRegistry
from squeeze.prune.methods.base import PruneMethod
from squeeze.prune.methods.magnitude import Magnitude
from squeeze.prune.methods.sparsegpt import SparseGPT
from squeeze.prune.methods.wanda import Wanda

PRUNE_METHODS: MethodRegistry[PruneMethod] = MethodRegistry("pruning method", "method")
for _method in (Magnitude(), Wanda(), SparseGPT()):
    PRUNE_METHODS.add(_method.name, _method)
