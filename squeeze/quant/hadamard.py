"""Orthogonal matrices for rotating a model's weights: randomised Hadamard matrices, and a random
orthogonal matrix where no Hadamard matrix of the order can be built here.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H / √n is orthogonal and spreads
every coordinate evenly over all n outputs (each entry has magnitude 1/√n): an outlier channel of
a weight or activation becomes n small ones, which round-to-nearest handles far better. That is
why QuaRot and SpinQuant rotate with them. Orders built here:

- Sylvester: n = 2^k (H_2 ⊗ H_2 ⊗ ...);
- Paley I: n = q + 1 for a prime q ≡ 3 (mod 4) (12, 20, 24, 32, 44, 48, 60, 72, ...);
- Paley II: n = 2 (q + 1) for a prime q ≡ 1 (mod 4) (12, 28, 36, 60, 76, ...);
- Kronecker products of those: 576 = 12 · 12 · 4, 896 = 28 · 32, 1536 = 12 · 128, 5120 = 20 · 256.

A rotation is kept as Kronecker factors, not as the n × n matrix: x (A ⊗ B) is x reshaped to
[a, b] with A applied along one axis and B along the other, so one row costs n (a + b)
multiplications instead of n² (2048 = 64 · 32: 20 times fewer; factors are merged up to
DENSE_BLOCK, where a product is no dearer than the copy between two). Prime powers q (GF(p^k) arithmetic) are left out: every hidden
size of the common model families is reached without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

SYLVESTER_BLOCK = 64  # largest power-of-two order hadamard_orders names: 2048 = 64 · 32
DENSE_BLOCK = 256  # blocks are merged up to this order: a product with a tiny block costs its copy, not its arithmetic


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _paley_kind(order: int) -> int | None:
    """1 or 2 when Paley's first or second construction gives a Hadamard matrix of ``order``."""
    if order % 4:
        return None
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return 1
    if _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return 2
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character of the integers mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def _paley(order: int) -> torch.Tensor:
    """A ±1 Hadamard matrix of ``order`` by Paley's construction (see :func:`_paley_kind`)."""
    kind = _paley_kind(order)
    q = order - 1 if kind == 1 else order // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = -1 if kind == 1 else 1
    c[1:, 1:] = _jacobsthal(q)
    if kind == 1:  # q ≡ 3 (mod 4): C is skew-symmetric and I + C is Hadamard
        return torch.eye(q + 1, dtype=torch.float64) + c
    # q ≡ 1 (mod 4): C is symmetric; each 0 becomes [[1, -1], [-1, -1]], each ±1 becomes ±[[1, 1], [1, -1]]
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(torch.eye(q + 1, dtype=torch.float64), zero) + torch.kron(c, one)


def _sylvester(order: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=None)
def hadamard_orders(n: int) -> tuple[int, ...] | None:
    """Orders of Hadamard blocks whose Kronecker product has order ``n`` (Paley orders, smallest
    first, then powers of two of at most SYLVESTER_BLOCK), or None when none is built here."""
    if n < 1:
        return None
    if n & (n - 1) == 0:
        blocks = []
        while n > 1:
            blocks.append(min(n, SYLVESTER_BLOCK))
            n //= blocks[-1]
        return tuple(blocks) or (1,)
    for order in range(12, n + 1, 4):  # the smallest Paley factor: the cheapest product
        if n % order == 0 and _paley_kind(order) is not None:
            rest = hadamard_orders(n // order)
            if rest is not None:
                return (order,) + tuple(r for r in rest if r > 1)
    return None


def hadamard_matrix(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of one block order (a power of two or a Paley order), float64."""
    return _sylvester(order) if order & (order - 1) == 0 else _paley(order)


@dataclass(frozen=True)
class Rotation:
    """An orthogonal n × n matrix Q = diag(signs) · (B₁ ⊗ B₂ ⊗ ...), its blocks orthonormal,
    float64. ``kind`` is "Hadamard" (``orders``: the Hadamard orders it is built from) or
    "random orthogonal"."""

    signs: torch.Tensor
    blocks: tuple[torch.Tensor, ...]
    kind: str
    orders: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return self.signs.numel()

    def describe(self) -> str:
        """e.g. ``576×576 randomised Hadamard (12 ⊗ 12 ⊗ 4)``."""
        n = self.size
        if self.kind != "Hadamard":
            return f"{n}×{n} {self.kind}"
        factors = " ⊗ ".join(str(order) for order in self.orders)
        return f"{n}×{n} randomised Hadamard" + (f" ({factors})" if len(self.orders) > 1 else "")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x Q along the last dimension (float64, on ``x``'s device). Each block multiplies the
        last axis of x reshaped to [rows, B₁, ..., Bₖ] in one matrix product; then that axis moves
        to the front of the blocks' axes, so the next block's is last, and after k steps the axes
        are back in order."""
        y = (x.to(torch.float64) * self.signs.to(x.device)).reshape(-1, *(b.shape[0] for b in self.blocks))
        for block in reversed(self.blocks):
            y = (y.reshape(-1, block.shape[0]) @ block.to(x.device)).reshape(y.shape)
            y = y.movedim(-1, 1).contiguous() if len(self.blocks) > 1 else y
        return y.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """Q itself, n × n (for tests and small sizes)."""
        return self.apply(torch.eye(self.size, dtype=torch.float64))


def random_hadamard(n: int, generator: torch.Generator) -> Rotation:
    """diag(s) · H / √n with random signs s from ``generator``: the signs go before the Hadamard
    transform, so every row of a rotated weight W Q mixes its columns with random signs (after
    it, they would only flip whole output columns). Where no Hadamard matrix of order ``n`` is
    built here (:func:`hadamard_orders`), a random orthogonal matrix from the same generator:
    the QR decomposition of a Gaussian matrix, R's diagonal made positive (Haar-distributed)."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    orders = hadamard_orders(n)
    if orders is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return Rotation(torch.ones(n, dtype=torch.float64), (q * torch.sign(torch.diagonal(r)),), "random orthogonal")
    blocks: list[torch.Tensor] = []
    for order in orders:
        block = hadamard_matrix(order) / math.sqrt(order)
        if blocks and blocks[-1].shape[0] * order <= DENSE_BLOCK:
            block = torch.kron(blocks.pop(), block)
        blocks.append(block)
    return Rotation(signs, tuple(blocks), "Hadamard", orders)
