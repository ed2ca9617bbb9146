"""Pruning masks from importance scores: plain tensors in, boolean keep-masks out.

A mask is ``True`` where the weight stays. Every function prunes an exact count, so the achieved
sparsity is the requested one up to rounding to whole weights (among equal scores the lower
index is pruned first):

- :func:`unstructured_mask`: the ``round(sparsity · numel)`` lowest scores of the whole matrix;
- :func:`row_mask`: the ``round(sparsity · in)`` lowest scores of every output row (Wanda's
  comparison group);
- :func:`n_m_mask`: in every run of ``m`` consecutive inputs of a row, the ``n`` highest stay;
- :func:`global_threshold`: the score below which a share of the weights of many layers lies.
"""

from __future__ import annotations

import torch

from squeeze.errors import SqueezeError


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)``: keep ``n`` of every ``m`` consecutive input weights (0 < n < m)."""
    try:
        n_text, m_text = pattern.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise SqueezeError(f"sparsity pattern {pattern!r} is not N:M (for example 2:4 or 4:8)") from None
    if not 0 < n < m:
        raise SqueezeError(f"sparsity pattern {pattern!r} must keep N of M weights with 0 < N < M")
    return n, m


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask pruning the ``count`` lowest scores along the last dimension; among equal scores
    the one at the lower index goes first (what a stable sort gives), so the result never depends
    on the kernel. A k-th-value selection, linear in the row length, instead of a sort."""
    length = scores.shape[-1]
    if count <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if count >= length:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = scores.kthvalue(count, dim=-1, keepdim=True).values
    below = scores < threshold
    equal = scores == threshold
    ties_to_prune = count - below.sum(dim=-1, keepdim=True)
    return ~(below | (equal & (equal.cumsum(dim=-1) <= ties_to_prune)))


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity · numel)`` lowest scores of the whole tensor."""
    return _prune_lowest(scores.reshape(-1), round(sparsity * scores.numel())).reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``round(sparsity · in)`` lowest scores of every row of ``scores [out, in]``."""
    return _prune_lowest(scores, round(sparsity * scores.shape[-1]))


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the input dimension."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"input dimension {in_features} is not a multiple of {m}")
    grouped = scores.reshape(out_features, in_features // m, m)
    return _prune_lowest(grouped, m - n).reshape(out_features, in_features)


def is_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every run of ``m`` consecutive inputs of every row has at most ``n`` nonzeros."""
    if weight.shape[-1] % m:
        return False
    nonzero = (weight != 0).reshape(-1, m).sum(dim=-1)
    return bool((nonzero <= n).all())


def global_threshold(scores: list[torch.Tensor], sparsity: float) -> tuple[torch.Tensor, int]:
    """The ``k``-th smallest score over all tensors, ``k = round(sparsity · total)``, and how many
    of the scores equal to it are to be pruned (ties), so the total pruned is exactly ``k``.

    Scores must be non-negative float32. Works without concatenating the tensors: for
    non-negative floats the int32 bit pattern orders like the value, so a 31-step bisection over
    the bit patterns, counting per tensor, finds the threshold exactly.
    """
    total = sum(s.numel() for s in scores)
    k = round(sparsity * total)
    if k == 0:
        return torch.tensor(-1.0), 0
    bits = [s.contiguous().view(torch.int32) for s in scores]
    lo, hi = 0, 0x7F800000  # +0.0 .. +inf
    # find the smallest pattern t with count(bits <= t) >= k
    while lo < hi:
        mid = (lo + hi) // 2
        count = sum(int((b <= mid).sum()) for b in bits)
        if count >= k:
            hi = mid
        else:
            lo = mid + 1
    below = sum(int((b < lo).sum()) for b in bits)
    threshold = torch.tensor([lo], dtype=torch.int32).view(torch.float32)[0]
    return threshold, k - below


def threshold_masks(scores: list[torch.Tensor], threshold: torch.Tensor, ties: int) -> list[torch.Tensor]:
    """Keep-masks pruning every score below ``threshold`` and the first ``ties`` scores equal to it."""
    masks = []
    for s in scores:
        mask = s > threshold
        equal = s == threshold
        if ties > 0 and bool(equal.any()):
            flat_equal = equal.reshape(-1).nonzero().squeeze(1)
            keep_equal = flat_equal[ties:]  # the first ``ties`` equal ones (by position) are pruned
            mask.reshape(-1)[keep_equal] = True
            ties = max(0, ties - flat_equal.numel())
        elif bool(equal.any()):
            mask |= equal
        masks.append(mask)
    return masks
