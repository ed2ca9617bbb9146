"""Dequantized weights computed once per scope, not once per call.

A quantized layer (squeeze.quant.linear.QuantizedLinear, squeeze.quant.nf4.NF4Linear) stores codes
and dequantizes them in ``forward``. Where one layer runs many times in a row, that repeated work
dominates: generating one token multiplies each weight by a single row, so dequantizing the weight
costs several times the product itself (on SmolLM2 the quickstart's 8 × 32 greedy tokens took twice
as long as its whole 16k-token evaluation).

Inside :func:`reuse_dequantized`, each layer's first call keeps its real-valued weight and later
calls reuse it; leaving the scope drops every kept weight. The scope is the caller's choice
because it costs memory: while it lasts, the layers that ran hold their weights at the compute
dtype beside their codes. squeeze opens it around one block's calibration re-runs (one block's
weights), around generation, and around the evaluation of a model held whole (which was held at
its full dtype before it was quantized).

A kept weight is reused only while its codes, scales and zero points are the very tensors it was
made from, unchanged (their version counters), at the same dtype and device: a layer changed in
place is dequantized again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

# one entry per layer that ran in the current scope: (layer, the source tensors, their versions and
# the dtype, the weight); the layer and sources are held so that their ids cannot be reused by
# other objects within the scope
_KEPT: ContextVar[dict[int, tuple[nn.Module, tuple, tuple, torch.Tensor]] | None] = ContextVar("dequantized_weights", default=None)


@contextmanager
def reuse_dequantized() -> Iterator[None]:
    """Within this scope quantized layers dequantize once (see the module docstring); a scope
    opened inside another shares the outer one's weights."""
    if _KEPT.get() is not None:
        yield
        return
    token = _KEPT.set({})
    try:
        yield
    finally:
        _KEPT.reset(token)


def dequantized(
    layer: nn.Module, sources: tuple[torch.Tensor, ...], dtype: torch.dtype, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``compute()``, the weight ``layer`` dequantizes from ``sources`` at ``dtype``: kept and reused
    within a :func:`reuse_dequantized` scope, computed afresh outside one."""
    kept = _KEPT.get()
    if kept is None or torch.is_grad_enabled():
        return compute()  # a kept weight made without autograd must not take part in a backward pass
    # inference tensors have no version counter, and cannot change outside inference mode
    stamp = (dtype, *(None if s.is_inference() else s._version for s in sources))
    entry = kept.get(id(layer))
    if entry is not None and entry[0] is layer and entry[2] == stamp and all(a is b for a, b in zip(entry[1], sources)):
        return entry[3]
    weight = compute()
    kept[id(layer)] = (layer, sources, stamp, weight)
    return weight


@contextmanager
def dequantize_each_call() -> Iterator[None]:
    """Within this scope quantized layers dequantize on every call, even inside an outer
    :func:`reuse_dequantized` scope: for layers that are released right after they run (a block
    streamed from disk), whose kept weights would otherwise outlive them."""
    token = _KEPT.set(None)
    try:
        yield
    finally:
        _KEPT.reset(token)
