"""SparseGPT (Frantar & Alistarh, 2023): prune a weight column by column and push each removed
weight's error onto the columns not yet visited, weighted by the inverse Hessian, as GPTQ does
for rounding errors.

The kernel is plain tensors in, plain tensors out: ``W [out, in]`` and the Hessian
``H = 2/n Σ x xᵀ [in, in]`` of the layer's calibration inputs give the pruned and updated
weight. The mask is chosen as the columns are reached: for unstructured sparsity, within each
block of ``block_size`` columns, the weights with the lowest ``w² / [H⁻¹]_jj²`` (the loss of
removing them) across the block's rows, or within each of its rows; for N:M, the same score within each group of M inputs of
a row. Unlike Wanda, the surviving weights change to make up for the removed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeeze.prune.masks import _prune_lowest, row_mask, unstructured_mask
from squeeze.quant.gptq import _inverse_cholesky


@dataclass(frozen=True)
class SparseGPTResult:
    weight: torch.Tensor  # float32 [out, in], exactly zero where pruned
    damp: float  # damping finally added to H's diagonal, as a fraction of its mean
    retries: int  # failed Cholesky factorisations before it
    loss: float  # Σ (w − ŵ)² / [H⁻¹]_jj² / 2: SparseGPT's estimate of the squared output error


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp_percent: float = 0.01,
    per_row: bool = False,
) -> SparseGPTResult:
    """Prune ``weight`` [out, in] to ``sparsity`` (or keep ``n`` of every ``m`` inputs) against ``hessian``.

    Unstructured masks are chosen per block of columns across all rows together (the paper's), or
    with ``per_row`` within each row of the block: every row then loses the same share of every
    block, as Wanda's comparison per output does."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    in_features = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h_inv, damp, retries = _inverse_cholesky(h, damp_percent)
    if n_m is not None:
        block_size = max(n_m[1], block_size // n_m[1] * n_m[1])  # groups of M never straddle two blocks
    loss = 0.0
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_inv_block = h_inv[start:end, start:end]
        diagonal = torch.diagonal(h_inv_block)
        if n_m is None:
            select = row_mask if per_row else unstructured_mask
            prune = ~select(block.pow(2) / diagonal.pow(2).unsqueeze(0), sparsity)
        else:
            prune = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                scores = block[:, group].pow(2) / diagonal[group].pow(2).unsqueeze(0)
                prune[:, group] = ~_prune_lowest(scores, n_m[1] - n_m[0])
            column = block[:, i]
            kept = column.masked_fill(prune[:, i], 0)
            err = (column - kept) / diagonal[i]
            block[:, i:] -= err.unsqueeze(1) * h_inv_block[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = err
        w[:, start:end] = block
        loss += float(errors.double().pow(2).sum()) / 2  # once per block: no device sync per column
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return SparseGPTResult(weight=w, damp=damp, retries=retries, loss=loss)
