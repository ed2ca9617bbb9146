"""Mask kernels prune exact counts, in the right places."""

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.prune.masks import global_threshold, is_n_m, n_m_mask, parse_pattern, row_mask, threshold_masks, unstructured_mask


def scores(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 1e-3  # no zeros


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_unstructured_prunes_the_lowest_exact_count(sparsity: float) -> None:
    s = scores(37, 53)
    keep = unstructured_mask(s, sparsity)
    pruned = round(sparsity * s.numel())
    assert int((~keep).sum()) == pruned
    if 0 < pruned < s.numel():
        assert s[~keep].max() <= s[keep].min()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_row_mask_prunes_each_row_alike(sparsity: float) -> None:
    s = scores(16, 40)
    keep = row_mask(s, sparsity)
    assert ((~keep).sum(dim=1) == round(sparsity * 40)).all()
    for row in range(16):
        assert s[row][~keep[row]].max() <= s[row][keep[row]].min()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_keeps_the_n_largest_of_every_m(n: int, m: int) -> None:
    s = scores(12, 64)
    keep = n_m_mask(s, n, m)
    groups = keep.reshape(12, 64 // m, m)
    assert (groups.sum(dim=-1) == n).all()
    grouped = s.reshape(12, 64 // m, m)
    assert (grouped.masked_fill(groups, float("inf")).amin(-1) >= 0).all()
    assert (grouped.masked_fill(~groups, -1).amax(-1) >= grouped.masked_fill(groups, 2).amin(-1)).all()
    assert is_n_m(s * keep, n, m) and not is_n_m(s, n, m)


def test_n_m_needs_divisible_inputs() -> None:
    with pytest.raises(ValueError):
        n_m_mask(scores(4, 10), 2, 4)
    assert not is_n_m(torch.zeros(4, 10), 2, 4)


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "a:b", "2:4:8"])
def test_bad_patterns(text: str) -> None:
    with pytest.raises(SqueezeError):
        parse_pattern(text)


def test_global_threshold_matches_a_sort_and_breaks_ties_exactly() -> None:
    layers = [scores(20, 30, seed=1), scores(7, 11, seed=2), scores(50, 8, seed=3)]
    layers[1][:3] = layers[0][0, 0]  # ties across layers at what may be the threshold
    for sparsity in (0.0, 0.2, 0.5, 0.9):
        threshold, ties = global_threshold(layers, sparsity)
        keeps = threshold_masks(layers, threshold, ties)
        total = sum(s.numel() for s in layers)
        k = round(sparsity * total)
        assert sum(int((~keep).sum()) for keep in keeps) == k
        if k:
            everything = torch.cat([s.reshape(-1) for s in layers])
            assert float(threshold) == float(everything.sort().values[k - 1])
            kept_min = min(float(s[keep].min()) for s, keep in zip(layers, keeps) if keep.any())
            pruned_max = max(float(s[~keep].max()) for s, keep in zip(layers, keeps) if (~keep).any())
            assert pruned_max <= kept_min


def test_ties_go_by_position() -> None:
    s = torch.ones(2, 8)
    assert row_mask(s, 0.5).tolist() == [[False] * 4 + [True] * 4] * 2
    assert n_m_mask(s, 2, 4).tolist() == [[False, False, True, True] * 2] * 2
    assert unstructured_mask(s, 0.25).reshape(-1).tolist() == [False] * 4 + [True] * 12


@pytest.mark.parametrize("seed", range(3))
def test_selection_equals_a_stable_sort_with_many_ties(seed: int) -> None:
    s = torch.randint(0, 5, (13, 24), generator=torch.Generator().manual_seed(seed)).float()

    def by_sort(scores: torch.Tensor, count: int) -> torch.Tensor:
        mask = torch.ones(scores.shape, dtype=torch.bool)
        mask.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[..., :count], False)
        return mask

    assert torch.equal(row_mask(s, 0.4), by_sort(s, round(0.4 * 24)))
    assert torch.equal(unstructured_mask(s, 0.3).reshape(-1), by_sort(s.reshape(-1), round(0.3 * s.numel())))
    assert torch.equal(n_m_mask(s, 2, 4), by_sort(s.reshape(13, 6, 4), 2).reshape(13, 24))
