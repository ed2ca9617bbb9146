"""Evaluation numbers against cases whose answers follow from the definitions."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from squeeze.evaluate import compare_causal, compare_encoder, parameter_count, tensor_bytes


class FixedLogits(nn.Module):
    """A 'language model' whose next-token logits are the same table row for every position."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(logits)

    def forward(self, input_ids: torch.Tensor):
        batch, length = input_ids.shape
        return SimpleNamespace(logits=self.table.expand(batch, length, -1))


def windows(n: int = 3, length: int = 10, vocab: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_uniform_model_has_perplexity_equal_to_vocabulary() -> None:
    cmp = compare_causal(FixedLogits(torch.zeros(7)), windows(), batch_size=2)
    assert cmp.tokens == 3 * 9
    assert cmp.perplexity == pytest.approx(7.0, rel=1e-6)


def test_identical_models_agree_completely() -> None:
    model = FixedLogits(torch.randn(7))
    cmp = compare_causal(model, windows(), reference=model)
    assert cmp.kl_divergence == pytest.approx(0.0, abs=1e-7)
    assert cmp.top1_agreement == 1.0
    assert cmp.perplexity == pytest.approx(cmp.reference_perplexity)


def test_kl_matches_the_closed_form() -> None:
    p_logits, q_logits = torch.randn(7), torch.randn(7)
    reference, model = FixedLogits(p_logits), FixedLogits(q_logits)
    cmp = compare_causal(model, windows(length=300), reference=reference, batch_size=2)  # > one metric chunk
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    expected = float((p.exp() * (p - q)).sum())
    assert cmp.kl_divergence == pytest.approx(expected, rel=1e-5)
    assert cmp.top1_agreement == float(p_logits.argmax() == q_logits.argmax())


def test_perplexity_is_exp_of_mean_nll() -> None:
    logits = torch.randn(7)
    ids = windows(n=2, length=200)
    cmp = compare_causal(FixedLogits(logits), ids, batch_size=1)
    nll = -logits.log_softmax(-1)[ids[:, 1:]].mean()
    assert cmp.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)


class MeanEncoder(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.scale = scale

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids) * self.scale)


def test_encoder_cosine_is_scale_invariant_and_bounded() -> None:
    torch.manual_seed(0)
    reference = MeanEncoder(1.0)
    scaled = MeanEncoder(3.0)
    scaled.embed.weight.data = reference.embed.weight.data.clone()
    ids = torch.randint(0, 10, (5, 6))
    cmp = compare_encoder(scaled, reference, ids, batch_size=2)
    assert cmp.windows == 5 and cmp.tokens == 30
    assert cmp.cosine_mean == pytest.approx(1.0, abs=1e-6) and cmp.cosine_min == pytest.approx(1.0, abs=1e-6)
    other = MeanEncoder(1.0)
    assert compare_encoder(other, reference, ids).cosine_mean < 0.99


def test_tied_tensors_are_counted_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert parameter_count(model) == 40
    assert tensor_bytes(model) == 40 * 4
