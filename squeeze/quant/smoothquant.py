"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

For a Linear layer fed by a norm, per input channel j:
``s_j = max|X_j|^α / max|W_j|^(1−α)``; the norm's weight (and bias) is divided by ``s`` and the
column j of every Linear it feeds is multiplied by ``s_j``. The product ``(X / s)(s W)ᵀ`` is
unchanged, so the model computes the same function, but the activations are flatter and quantize
to 8 bits with less error. The kernel below works on plain tensors; the pass finds the norm →
Linear pairs and applies it block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# norm → the Linear layers that read its output, by name inside a decoder block. Only norms whose
# output feeds nothing else can be folded: in post-norm encoders (BERT) the norm's output is also
# the residual stream, so dividing it would change the model.
NORM_TO_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


@dataclass(frozen=True)
class SmoothGroup:
    """A norm inside a block and the Linear layers that read its output (names relative to the block)."""

    norm: str
    linears: tuple[str, ...]


def smoothing_groups(block: nn.Module) -> list[SmoothGroup]:
    """The norm → Linear pairs of one block that smoothing can fold into."""
    names = dict(block.named_modules())
    groups = []
    for norm, linears in NORM_TO_LINEARS:
        module = names.get(norm)
        if module is None or not all(isinstance(names.get(n), nn.Linear) for n in linears):
            continue
        if not hasattr(module, "weight") or "gemma" in type(module).__name__.lower():
            continue  # Gemma's norm scales by (1 + weight): dividing its weight is not a fold
        groups.append(SmoothGroup(norm, linears))
    return groups


def smoothing_factors(activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` per input channel (``weights`` are [out, in], sharing inputs)."""
    weight_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    factors = activation_max.float().clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    # channels that never fire or have no weight keep factor 1 rather than a meaningless extreme
    dead = (activation_max == 0) | (weight_max == 0)
    return torch.where(dead, torch.ones_like(factors), factors)


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: list[nn.Linear], factors: torch.Tensor) -> None:
    """Divide the norm's output by ``factors`` and multiply the matching weight columns: same function."""
    norm.weight.div_(factors.to(norm.weight.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.div_(factors.to(bias.dtype))
    for linear in linears:
        linear.weight.mul_(factors.to(linear.weight.dtype))
