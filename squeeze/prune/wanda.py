"""Wanda (Sun et al., 2023): prune by |W| times the norm of the input feature the weight reads.

The score of weight ``W[i, j]`` is ``|W[i, j]| · ‖X_j‖₂``, where ``X_j`` is input feature ``j``
over every calibration token. The weights are compared within each output row (or within each
run of ``m`` inputs for N:M patterns), and the lowest-scoring ones are removed; nothing is
updated afterwards, so one forward pass of calibration text per block is all it costs.
"""

from __future__ import annotations

import torch


class InputNormAccumulator:
    """Running ``Σ x_j²`` per input feature over every row a Linear layer sees (float32)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.squared = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.squared += x.pow(2).sum(dim=0)
        self.rows += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature."""
        return self.squared.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖X_j‖₂`` for ``weight [out, in]`` and ``input_norms [in]`` (float32)."""
    return weight.detach().float().abs() * input_norms.to(weight.device).float().unsqueeze(0)
