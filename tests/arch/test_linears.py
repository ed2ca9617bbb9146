"""Every weight matrix as a Linear layer (squeeze.linears): GPT-2's Conv1D and fused
mixture-of-experts weights compute the same as Linear layers, are written back in the layout
transformers loads, and every expert sees every calibration token."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from squeeze.formats.files import dense_tensors
from squeeze.linears import (
    ExpertLinears, TransposedLinear, all_experts_calibrating, as_linear_layers, expert_layers, to_held_layout,
    uncompressed_matrices,
)
from squeeze.models.tiny import tiny_model


def _ids() -> torch.Tensor:
    return torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("architecture", ["gpt2", "mixtral", "qwen3_moe"])
def test_held_as_linear_layers_the_model_computes_the_same(architecture: str) -> None:
    model = tiny_model(architecture, vocab_size=1000)
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    replaced = as_linear_layers(model)
    assert replaced and not any(isinstance(m, Conv1D) for m in model.modules())
    with torch.no_grad():
        after = model(input_ids=_ids()).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert as_linear_layers(model) == []  # once is enough


def test_conv1d_weights_go_back_in_their_own_layout() -> None:
    model = tiny_model("gpt2", vocab_size=1000)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    as_linear_layers(model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, TransposedLinear) and layer.weight.shape == (192, 64)
    written = dense_tensors(model)
    assert all(torch.equal(written[k], original[k]) for k in written)
    # and a checkpoint's tensors come back into the held layout
    held = to_held_layout(model, {"transformer.h.0.attn.c_attn.weight": original["transformer.h.0.attn.c_attn.weight"]})
    assert torch.equal(held["transformer.h.0.attn.c_attn.weight"], layer.weight)


def test_experts_are_named_as_the_original_checkpoints_name_them() -> None:
    mixtral, qwen = tiny_model("mixtral", vocab_size=1000), tiny_model("qwen3_moe", vocab_size=1000)
    as_linear_layers(mixtral), as_linear_layers(qwen)
    assert isinstance(mixtral.model.layers[0].mlp.experts, ExpertLinears)
    assert "model.layers.0.mlp.experts.3.w2.weight" in dense_tensors(mixtral)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in dense_tensors(qwen)
    names = [n for n, m in qwen.named_modules() if isinstance(m, nn.Linear)]
    assert len(expert_layers(qwen, names)) == 2 * 4 * 3  # blocks x experts x projections


def test_every_expert_sees_every_token_while_calibrating() -> None:
    model = tiny_model("qwen3_moe", vocab_size=1000)
    as_linear_layers(model)
    experts = model.model.layers[0].mlp.experts
    seen: dict[int, int] = {}
    hooks = [
        e.gate_proj.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, seen.get(i, 0) + a[0].shape[0]))
        for i, e in enumerate(experts)
    ]
    try:
        with torch.no_grad():
            routed = model(input_ids=_ids()).logits
            routed_seen = dict(seen)
            seen.clear()
            with all_experts_calibrating():
                calibrating = model(input_ids=_ids()).logits
    finally:
        for hook in hooks:
            hook.remove()
    tokens = _ids().numel()
    assert sum(routed_seen.values()) == 2 * tokens  # top-2 routing: each token reaches two experts
    assert seen == {i: tokens for i in range(4)}  # every expert, every token, once
    torch.testing.assert_close(calibrating, routed, rtol=0, atol=0)


def test_routers_are_reported_uncompressed() -> None:
    model = tiny_model("mixtral", vocab_size=1000)
    as_linear_layers(model)
    compressed = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    left = uncompressed_matrices(model, compressed)
    assert set(left) == {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    assert "not a Linear layer" in left["model.layers.0.mlp.gate.weight"]


def test_fused_experts_of_another_layout_are_refused() -> None:
    from squeeze.errors import SqueezeError

    model = tiny_model("qwen3_moe", vocab_size=1000)
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj_bias = nn.Parameter(torch.zeros(4, 128))
    with pytest.raises(SqueezeError, match=r"model.layers.0.mlp.experts .*gate_up_proj_bias.*not in the gate/up/down layout"):
        as_linear_layers(model)
