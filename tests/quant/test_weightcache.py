"""Dequantize once per scope (squeeze.weightcache): the same outputs, one dequantization per layer
within a scope, a fresh one when the codes change or the scope ends, none kept under autograd."""

from __future__ import annotations

import torch
from torch import nn

from squeeze.generate import generate
from squeeze.models.tiny import tiny_model
from squeeze.quant.apply import QuantizeConfig, quantize_model
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.nf4 import NF4Linear
from squeeze.quant.scheme import scheme_from_options
from squeeze.weightcache import reuse_dequantized


def counted(monkeypatch, cls) -> list[int]:
    """Count calls of ``cls.dequantized_weight``."""
    calls = [0]
    original = cls.dequantized_weight

    def counting(self, dtype=None):
        calls[0] += 1
        return original(self, dtype)

    monkeypatch.setattr(cls, "dequantized_weight", counting)
    return calls


def layer(bits: int = 4) -> QuantizedLinear:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    return QuantizedLinear.from_linear(linear, scheme_from_options(mode="per-group", bits=bits, group_size=16))


@torch.no_grad()
def test_one_dequantization_per_scope_with_the_same_outputs(monkeypatch):
    q = layer()
    x = torch.randn(3, 64)
    plain = [q(x) for _ in range(3)]
    calls = counted(monkeypatch, QuantizedLinear)
    with reuse_dequantized():
        kept = [q(x) for _ in range(3)]
        with reuse_dequantized():  # nested: shares the outer scope
            kept.append(q(x))
    assert calls[0] == 1
    for a, b in zip(plain, kept):
        assert torch.equal(a, b)
    with reuse_dequantized():  # a new scope starts empty
        q(x)
    assert calls[0] == 2
    q(x)
    q(x)  # outside any scope: every call dequantizes
    assert calls[0] == 4


@torch.no_grad()
def test_changed_codes_are_dequantized_again(monkeypatch):
    q = layer()
    x = torch.randn(2, 64)
    calls = counted(monkeypatch, QuantizedLinear)
    with reuse_dequantized():
        before = q(x)
        q.weight_codes.mul_(0)  # changed in place: its version counter moves
        after_in_place = q(x)
        q.weight_scale = q.weight_scale * 2  # a new tensor
        after_new = q(x)
    assert calls[0] == 3
    assert not torch.equal(before, after_in_place)
    assert torch.equal(after_in_place, after_new)  # codes are zero: any scale gives the bias
    assert torch.allclose(after_new, q.bias.expand_as(after_new))


def test_nothing_is_kept_under_autograd(monkeypatch):
    q = layer()
    x = torch.randn(2, 64, requires_grad=True)
    calls = counted(monkeypatch, QuantizedLinear)
    with reuse_dequantized():
        q(x).sum().backward()
        q(x).sum().backward()
    assert calls[0] == 2
    assert x.grad is not None


@torch.no_grad()
def test_nf4_layers_dequantize_once(monkeypatch):
    torch.manual_seed(0)
    q = NF4Linear.from_linear(nn.Linear(128, 16))
    x = torch.randn(2, 128)
    plain = q(x)
    calls = counted(monkeypatch, NF4Linear)
    with reuse_dequantized():
        assert torch.equal(q(x), plain)
        assert torch.equal(q(x), plain)
    assert calls[0] == 1


def test_generation_dequantizes_each_layer_once_per_continuation(monkeypatch):
    model = tiny_model("llama", vocab_size=64).eval()
    quantize_model(model, QuantizeConfig(scheme=scheme_from_options(mode="per-group", bits=4, group_size=16)))
    layers = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    prompt = torch.tensor([[1, 5, 9, 2]])
    calls = counted(monkeypatch, QuantizedLinear)
    tokens = generate(model, prompt, 6)
    assert calls[0] == layers  # not layers × tokens
    # the same tokens as dequantizing on every call
    with torch.no_grad():
        ids, expected = prompt, []
        for _ in range(6):
            logits = model(input_ids=ids).logits[:, -1]
            expected.append(int(logits.argmax(-1)))
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert tokens == expected
