"""The sampler's math: greedy limit, top-k count, nucleus prefix, renormalisation, seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from squeeze.errors import SqueezeError
from squeeze.sampling import Sampling, next_token_probs, sample


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs))


def test_temperature_to_zero_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    cold = next_token_probs(logits, Sampling(temperature=1e-4))
    assert torch.equal(cold.argmax(-1), logits.argmax(-1))
    assert torch.allclose(cold.max(-1).values, torch.ones(5), atol=1e-6)
    greedy = next_token_probs(logits, Sampling())
    assert torch.equal(greedy, torch.nn.functional.one_hot(logits.argmax(-1), 100).float())
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, Sampling(temperature=1e-4), generator), logits.argmax(-1))
    assert torch.equal(sample(logits, Sampling()), logits.argmax(-1))


def test_temperature_one_is_the_softmax() -> None:
    logits = torch.randn(3, 50)
    assert torch.allclose(next_token_probs(logits, Sampling(temperature=1.0)), torch.softmax(logits, -1), atol=1e-6)
    # temperature 2 is the softmax of halved logits
    assert torch.allclose(next_token_probs(logits, Sampling(temperature=2.0)), torch.softmax(logits / 2, -1), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 7, 99, 100, 500])
def test_top_k_keeps_exactly_k_largest(k: int) -> None:
    torch.manual_seed(k)
    logits = torch.randn(4, 100)
    probs = next_token_probs(logits, Sampling(temperature=1.0, top_k=k))
    kept = probs > 0
    assert (kept.sum(-1) == min(k, 100)).all()
    top = logits.topk(min(k, 100), dim=-1).indices
    assert kept.gather(-1, top).all()
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-6)


def test_renormalising_keeps_the_ratios() -> None:
    logits = torch.randn(1, 30)
    full = torch.softmax(logits, -1)
    probs = next_token_probs(logits, Sampling(temperature=1.0, top_k=5))
    kept = probs[0] > 0
    ratios = probs[0][kept] / full[0][kept]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    assert math.isclose(float(ratios[0]), 1 / float(full[0][kept].sum()), rel_tol=1e-5)


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.1, 1),  # the first token alone already reaches 0.1
        (0.5, 1),  # exactly the first token's mass
        (0.6, 2),
        (0.75, 2),  # exactly at the boundary of the first two
        (0.8, 3),
        (0.875, 3),
        (0.9, 4),
        (1.0, 5),  # p = 1 keeps everything
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(p: float, kept: int) -> None:
    # masses in binary fractions, so that the boundaries are exact; the order is scrambled
    masses = [0.0625, 0.5, 0.125, 0.0625, 0.25]
    probs = next_token_probs(_logits(masses), Sampling(temperature=1.0, top_p=p))
    nonzero = (probs > 0).sum().item()
    assert nonzero == kept
    order = sorted(range(5), key=lambda i: -masses[i])
    expected = torch.zeros(5)
    chosen = order[:kept]
    total = sum(masses[i] for i in chosen)
    for i in chosen:
        expected[i] = masses[i] / total
    assert torch.allclose(probs, expected, atol=1e-6)


def test_top_p_applies_after_top_k() -> None:
    masses = [0.4, 0.3, 0.2, 0.1]
    # top-k 2 leaves 4/7 and 3/7; top-p 0.5 then keeps only the first (4/7 >= 0.5)
    probs = next_token_probs(_logits(masses), Sampling(temperature=1.0, top_k=2, top_p=0.5))
    assert torch.allclose(probs, torch.tensor([1.0, 0, 0, 0]), atol=1e-6)
    probs = next_token_probs(_logits(masses), Sampling(temperature=1.0, top_k=2, top_p=0.6))
    assert torch.allclose(probs, torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=1e-6)


def test_same_seed_same_draws_and_frequencies_follow_the_distribution() -> None:
    logits = _logits([0.5, 0.25, 0.125, 0.125]).expand(20000, 4)
    setting = Sampling(temperature=1.0)
    first = sample(logits, setting, torch.Generator().manual_seed(7))
    again = sample(logits, setting, torch.Generator().manual_seed(7))
    other = sample(logits, setting, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    freq = torch.bincount(first, minlength=4).float() / 20000
    # 4 standard deviations of a binomial share at n = 20000 is below 0.015
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.125, 0.125]), atol=0.015)
    nucleus = sample(logits, Sampling(temperature=1.0, top_p=0.75), torch.Generator().manual_seed(7))
    assert set(nucleus.unique().tolist()) == {0, 1}


@pytest.mark.parametrize(
    "options, message",
    [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top-k"), ({"top_p": 0}, "top-p"), ({"top_p": 1.5}, "top-p")],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(SqueezeError, match=message):
        Sampling(**options)


def test_ties_rank_the_lower_token_id_first() -> None:
    logits = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    top2 = next_token_probs(logits, Sampling(temperature=1.0, top_k=2))
    assert torch.equal(top2 > 0, torch.tensor([False, True, True, False, False]))
    # the three tied maxima hold about 0.3 each; p = 0.5 needs two of them, the lower ids
    nucleus = next_token_probs(logits, Sampling(temperature=1.0, top_p=0.5))
    assert torch.allclose(nucleus, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))
    assert int(sample(logits, Sampling())) == 1
    assert torch.equal(next_token_probs(logits, Sampling()), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


def test_any_leading_shape_and_rows_sum_to_one() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    setting = Sampling(temperature=0.7, top_k=10, top_p=0.8)
    probs = next_token_probs(logits, setting)
    assert probs.shape == (2, 3, 40) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert ((probs > 0).sum(-1) <= 10).all() and ((probs > 0).sum(-1) >= 1).all()
    drawn = sample(logits, setting, torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 3) and (probs.gather(-1, drawn.unsqueeze(-1)) > 0).all()
