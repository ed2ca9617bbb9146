"""What every pruning method does around its scores: zero the weights a mask drops, measure what
that cost, and rank by magnitude where no statistics exist.

``config`` arguments are :class:`squeeze.prune.config.PruneConfig`; it is named only in
annotations here, because the config module imports the method registry, which imports this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.calib.targets import matches
from squeeze.prune.masks import global_threshold, n_m_mask, row_mask, threshold_masks, unstructured_mask

Plan = dict[str, tuple[nn.Linear, float]]  # layer name → (layer, the sparsity it gets)


@dataclass(frozen=True)
class LayerSparsity:
    """What pruning did to one layer."""

    name: str
    shape: tuple[int, int]
    target: float  # the sparsity asked for
    zeros: int  # weights exactly zero afterwards (pruned ones and any that were zero before)
    relative_error: float  # ‖W − Ŵ‖_F / ‖W‖_F
    max_abs_error: float  # the largest |w − ŵ| (magnitude, Wanda: the largest weight removed)
    output_error: float | None = None  # SparseGPT: ‖(W − Ŵ)X‖_F / ‖WX‖_F on the calibration inputs

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)


@dataclass
class PruneResult:
    layers: list[LayerSparsity]
    dense: list[str]  # targeted layers left dense (sparsity 0 by a per-layer rule)
    notes: list[str] = field(default_factory=list)
    calibration_s: float = 0.0


def apply_mask(name: str, linear: nn.Linear, keep: torch.Tensor, target: float) -> LayerSparsity:
    """Zero the weights of ``linear`` where ``keep`` is False and measure what was removed."""
    weight = linear.weight.data
    original_norm = weight.float().norm()
    removed = weight.float().masked_fill(keep, 0)
    removed_norm, max_pruned = removed.norm(), removed.abs().max()
    weight.masked_fill_(~keep, 0.0)  # +0.0: a multiply would leave -0.0 for negative weights
    return LayerSparsity(
        name=name,
        shape=(linear.out_features, linear.in_features),
        target=target,
        zeros=int((weight == 0).sum()),
        relative_error=float(removed_norm / original_norm.clamp_min(1e-30)),
        max_abs_error=float(max_pruned),
    )


def layer_mask(scores: torch.Tensor, sparsity: float, config: PruneConfig, per_row: bool) -> torch.Tensor:
    """The keep-mask of one layer's ``scores``: N:M when the config has a pattern, else the lowest
    ``sparsity`` share of each row (``per_row``) or of the whole matrix."""
    if config.n_m is not None:
        return n_m_mask(scores, *config.n_m)
    return row_mask(scores, sparsity) if per_row else unstructured_mask(scores, sparsity)


def prune_by_magnitude(config: PruneConfig, plan: Plan, on_step: Callable[[str], None] | None) -> list[LayerSparsity]:
    """Remove the smallest |W| of every planned layer, per layer or (``scope="global"``) with one
    threshold across the layers no per-layer rule names."""
    done: list[LayerSparsity] = []
    if config.scope == "global":
        # layers a per-layer rule gave their own sparsity are ranked alone; the rest share one threshold
        own = {name for name, _ in plan.items() if any(matches(name, p) for p, _ in config.layer_sparsity)}
        pool = [name for name in plan if name not in own]
        scores = [plan[name][0].weight.detach().float().abs() for name in pool]
        threshold, ties = global_threshold(scores, config.sparsity)
        for name, keep in zip(pool, threshold_masks(scores, threshold, ties)):
            done.append(apply_mask(name, plan[name][0], keep, config.sparsity))
            if on_step:
                on_step(name)
        del scores
        plan = {name: plan[name] for name in own}
    for name, (linear, sparsity) in plan.items():
        keep = layer_mask(linear.weight.detach().float().abs(), sparsity, config, per_row=False)
        done.append(apply_mask(name, linear, keep, sparsity))
        if on_step:
            on_step(name)
    return done
