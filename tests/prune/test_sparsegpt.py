"""SparseGPT's kernel: exact masks per block, the N:M pattern, and less output error than Wanda."""

import pytest
import torch

from squeeze.calib.observers import HessianAccumulator
from squeeze.prune.masks import is_n_m, row_mask
from squeeze.prune.sparsegpt import sparsegpt_prune
from squeeze.prune.wanda import wanda_scores


def correlated_inputs(n: int = 2048, dim: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * 0.3 + torch.eye(dim)
    scale = torch.linspace(0.2, 3.0, dim)  # some input features carry far more energy than others
    return (torch.randn(n, dim, generator=g) @ mix) * scale


def setup(out: int = 48, dim: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs(dim=dim)
    acc = HessianAccumulator(dim)
    acc.add(x)
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(1)), acc.hessian, x


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_prunes_the_exact_share_of_every_block(sparsity: float) -> None:
    w, h, _ = setup(dim=192)
    pruned = sparsegpt_prune(w, h, sparsity, block_size=64).weight
    for start in range(0, 192, 64):
        block = pruned[:, start : start + 64]
        assert int((block == 0).sum()) == round(sparsity * block.numel())


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_per_row_masks_prune_the_exact_share_of_every_row_of_every_block(sparsity: float) -> None:
    w, h, x = setup(dim=192)
    per_row = sparsegpt_prune(w, h, sparsity, block_size=64, per_row=True).weight
    joint = sparsegpt_prune(w, h, sparsity, block_size=64).weight
    for start in range(0, 192, 64):
        zeros = (per_row[:, start : start + 64] == 0).sum(dim=1)
        assert bool((zeros == round(sparsity * 64)).all())
    # the joint choice lets rows differ; the per-row one is a different, still compensated, mask
    assert not torch.equal(per_row == 0, joint == 0)
    reference = x @ w.t()
    assert float((x @ per_row.t() - reference).norm()) < float((x @ (w * row_mask(w.abs(), sparsity)).t() - reference).norm())


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_pattern(n: int, m: int) -> None:
    w, h, _ = setup()
    pruned = sparsegpt_prune(w, h, 1 - n / m, n_m=(n, m), block_size=30).weight  # block rounded to whole groups
    assert is_n_m(pruned, n, m) and int((pruned == 0).sum()) == w.numel() * (m - n) // m


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_less_output_error_than_wanda(pattern) -> None:
    from squeeze.prune.masks import n_m_mask

    w, h, x = setup()
    solved = sparsegpt_prune(w, h, 0.5, n_m=pattern)
    scores = wanda_scores(w, x.norm(dim=0))
    keep = n_m_mask(scores, *pattern) if pattern else row_mask(scores, 0.5)
    wanda = w * keep
    error = lambda pruned: float(((x @ (w - pruned).T) ** 2).mean())  # noqa: E731
    assert error(solved.weight) < 0.8 * error(wanda)
    assert solved.loss > 0 and solved.retries == 0


def test_diagonal_hessian_changes_no_surviving_weight() -> None:
    w, _, _ = setup()
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5)
    pruned = sparsegpt_prune(w, h, 0.5, damp_percent=1e-6).weight
    kept = pruned != 0
    torch.testing.assert_close(pruned[kept], w[kept])
