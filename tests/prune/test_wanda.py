"""Wanda's statistics and scores."""

import torch

from squeeze.prune.masks import row_mask
from squeeze.prune.wanda import InputNormAccumulator, wanda_scores


def test_input_norms_equal_the_norm_over_all_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 8, generator=g), torch.randn(3, 4, 8, generator=g)]
    acc = InputNormAccumulator(8)
    for batch in batches:
        acc.add(batch)
    every_token = torch.cat([b.reshape(-1, 8) for b in batches])
    assert acc.rows == 22
    torch.testing.assert_close(acc.norms, every_token.norm(dim=0))


def test_a_large_weight_on_a_silent_input_is_pruned_before_a_small_one_on_a_loud_input() -> None:
    weight = torch.tensor([[5.0, 0.1, 1.0, 1.0]])
    norms = torch.tensor([0.0, 100.0, 1.0, 1.0])
    keep = row_mask(wanda_scores(weight, norms), 0.25)
    assert not keep[0, 0] and keep[0, 1]  # magnitude alone would have pruned the 0.1
    assert torch.equal(wanda_scores(weight, norms), weight.abs() * norms)
