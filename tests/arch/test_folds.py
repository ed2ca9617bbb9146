"""Folds are found from each block's data flow, whatever the architecture names its modules, and
every fold found leaves the model's function unchanged (issue #17, item 1)."""

from __future__ import annotations

import pytest
import torch

from squeeze.calib.blocks import block_list, block_stacks
from squeeze.calib.folds import OFFSET_NORM, find_folds, fold_scales
from squeeze.calib.capture import next_arguments
from squeeze.calib.pipeline import capture_block_inputs
from squeeze.models.tiny import tiny_model
from squeeze.seq2seq import forward_inputs

# the producers each architecture's block folds, in the order it computes them
EXPECTED = {
    "llama": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    "qwen3": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],
    # sandwich norms: the post-norms feed the residual; the pre-norms fold, with (1 + w) algebra
    "gemma2": ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"],
    "gemma3": ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"],
    # fused projections: the norms fold into qkv_proj and gate_up_proj
    "phi3": ["input_layernorm", "post_attention_layernorm"],
    # post-norm: only the gated MLP's up branch
    "olmo2": ["mlp.up_proj"],
    # parallel attention, two norms (GPT-NeoX) or one feeding both branches (Falcon)
    "gpt_neox": ["input_layernorm", "post_attention_layernorm"],
    "falcon": ["input_layernorm"],
    "bert": ["attention.self.value"],
}
# encoder-decoders: the encoder's blocks, then the decoder's (cross-attention's keys and values read
# the encoder's output, so its norm folds into its query alone)
EXPECTED_STACKS = {
    "t5": (
        ["layer.0.layer_norm", "layer.0.SelfAttention.v", "layer.1.layer_norm", "layer.1.DenseReluDense.wi_1"],
        ["layer.0.layer_norm", "layer.0.SelfAttention.v", "layer.1.layer_norm", "layer.1.EncDecAttention.v",
         "layer.2.layer_norm", "layer.2.DenseReluDense.wi_1"],
    ),
    # post-norm, like BERT: only the attention's value paths
    "bart": (["self_attn.v_proj"], ["self_attn.v_proj", "encoder_attn.v_proj"]),
}


def _model_and_calls(architecture: str):
    model = tiny_model(architecture, vocab_size=1000)
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    return model, ids, capture_block_inputs(model, [{"input_ids": ids}])


@pytest.mark.parametrize("architecture", list(EXPECTED))
def test_folds_are_found_and_keep_the_function(architecture: str) -> None:
    model, ids, calls = _model_and_calls(architecture)
    _, blocks = block_list(model)
    with torch.no_grad():
        before = model(input_ids=ids)[0]
    generator = torch.Generator().manual_seed(1)
    hidden = calls.first[0][0]
    for index, block in enumerate(blocks):
        kwargs = calls.for_block(index)[0]
        found = find_folds(block, hidden, kwargs)
        assert [f.prev for f in found.folds] == EXPECTED[architecture], f"block {index}"
        with torch.no_grad():
            following = block(hidden, **kwargs)
            hidden = following[0] if isinstance(following, tuple) else following
        # any positive scales, not only the powers of two of the proof
        for fold in found.folds:
            linears = [block.get_submodule(n) for n in fold.linears]
            scales = torch.exp(torch.randn(linears[0].in_features, generator=generator))
            fold_scales(block.get_submodule(fold.prev), linears, scales, fold.kind)
    with torch.no_grad():
        after = model(input_ids=ids)[0]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", list(EXPECTED_STACKS))
def test_encoder_decoder_folds_are_found_in_both_stacks_and_keep_the_function(architecture: str) -> None:
    model = tiny_model(architecture, vocab_size=1000)
    inputs = forward_inputs(model, torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        before = model(**inputs).logits
    generator = torch.Generator().manual_seed(1)
    for stack, (prefix, blocks) in enumerate(block_stacks(model)):
        # the decoder's inputs come from the encoder as folded so far, as in calibration
        calls = capture_block_inputs(model, [inputs], stack=stack)
        hidden, kwargs = calls.first[0]
        for index, block in enumerate(blocks):
            found = find_folds(block, hidden, kwargs)
            assert [f.prev for f in found.folds] == EXPECTED_STACKS[architecture][stack], f"{prefix}.{index}"
            with torch.no_grad():
                output = block(hidden, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
            if index + 1 < len(blocks):
                kwargs = next_arguments(block, output, calls.for_block(index + 1)[0])
            for fold in found.folds:
                linears = [block.get_submodule(n) for n in fold.linears]
                scales = torch.exp(torch.randn(linears[0].in_features, generator=generator))
                fold_scales(block.get_submodule(fold.prev), linears, scales, fold.kind)
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_gemma_norms_fold_with_their_own_algebra() -> None:
    model, _, calls = _model_and_calls("gemma2")
    found = find_folds(model.model.layers[0], calls.first[0][0], calls.for_block(0)[0])
    kinds = {f.prev: f.kind for f in found.folds}
    assert kinds["input_layernorm"] == OFFSET_NORM and kinds["pre_feedforward_layernorm"] == OFFSET_NORM
    assert kinds["mlp.up_proj"] == "linear"


def test_a_failed_proof_leaves_the_block_as_it_was() -> None:
    model, _, calls = _model_and_calls("bert")
    block = model.encoder.layer[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    found = find_folds(block, calls.first[0][0], calls.for_block(0)[0])
    assert "attention.output.LayerNorm -> intermediate.dense" in found.skipped
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_later_blocks_prove_the_known_folds_in_one_run() -> None:
    """Block 1 has block 0's candidates: its folds are proven together, in one run after the trace;
    a verdict that does not hold there sends it back to proving each candidate alone."""
    from squeeze.calib.folds import BlockFolds, Fold

    model, _, calls = _model_and_calls("llama")
    hidden = calls.first[0][0]
    blocks = model.model.layers
    known: dict = {}
    first = find_folds(blocks[0], hidden, calls.for_block(0)[0], known=known)
    with torch.no_grad():
        hidden = blocks[0](hidden, **calls.for_block(0)[0])
    runs = []
    hook = blocks[1].register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        second = find_folds(blocks[1], hidden, calls.for_block(1)[0], known=known)
        assert len(runs) == 2  # the trace, then all the folds at once
        assert second.folds == first.folds and second.skipped == first.skipped
        # a wrong verdict (q_proj -> o_proj is not a fold) is caught and each candidate proven alone
        signature = next(iter(known))
        known[signature] = BlockFolds([Fold("self_attn.q_proj", ("self_attn.o_proj",), "linear")], {})
        runs.clear()
        third = find_folds(blocks[1], hidden, calls.for_block(1)[0], known=known)
    finally:
        hook.remove()
    assert len(runs) > 2 and third.folds == first.folds
