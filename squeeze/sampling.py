"""The next-token sampler of ``squeeze generate``: temperature, then top-k, then top-p (nucleus).

Implemented here, over plain logits, so that one seed gives one random stream for every model
compared: each draw uses the same generator on the CPU, whatever device the model runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from squeeze.errors import SqueezeError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy (argmax); otherwise logits are divided by it, the ``top_k``
    most likely tokens are kept, then the smallest set of most likely tokens whose probability
    reaches ``top_p``, and the kept probabilities are renormalised to sum to 1."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SqueezeError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SqueezeError(f"top-k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SqueezeError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True at temperature 0: the argmax, no random draw."""
        return self.temperature == 0

    def describe(self) -> str:
        """The settings in words, for a table header ("greedy", "temperature 0.8, top-k 40")."""
        if self.greedy:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        parts += [f"top-k {self.top_k}"] if self.top_k else []
        parts += [f"top-p {self.top_p:g}"] if self.top_p is not None else []
        return ", ".join(parts)


def next_token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a token is drawn from, ``[..., vocab]`` (float32, rows sum to 1).

    Ties: sorting is stable, so among equal probabilities the lower token id ranks first; top-k
    and top-p keep exactly their count of tokens, tied or not. Greedy gives the one-hot of the
    argmax (the lowest id among equal maxima, as ``argmax`` does). The top-p boundary is compared
    on float32 cumulative sums, so a ``top_p`` equal to a cumulative mass that float32 cannot
    represent exactly may keep one token more or fewer than exact arithmetic would.
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if sampling.top_k is not None and sampling.top_k < probs.shape[-1]:
        keep[..., sampling.top_k:] = False
        sorted_probs = sorted_probs * keep
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    if sampling.top_p is not None and sampling.top_p < 1:
        # keep a token while the mass before it is still short of p: the smallest prefix reaching p
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep &= before < sampling.top_p
        keep[..., 0] = True
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, kept)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` ``[..., vocab]``: the argmax when greedy, else a draw
    from :func:`next_token_probs` with ``generator`` (a CPU generator; probabilities are moved to
    the CPU so that the draw does not depend on the device)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, sampling).cpu()
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return drawn.to(logits.device)
