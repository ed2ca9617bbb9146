"""Block-by-block work feeds every block what the full forward gives it (issue #17, item 4): with
nothing compressed, each block's output equals the full model's at that depth, for every
architecture, with padding in the batch, and with layers of different attention types."""

from __future__ import annotations

import pytest
import torch

from squeeze.calib.blocks import all_blocks, block_list, block_stacks, is_encoder_decoder
from squeeze.calib.capture import CARRIED
from squeeze.calib.pipeline import calibrate_sequentially, capture_block_inputs, run_block
from squeeze.models.tiny import ARCHITECTURES, tiny_model


def _batch(model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    # longer than the sliding windows (16), with padding at the end of the second row
    ids = torch.randint(5, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if model is not None and is_encoder_decoder(model):
        batch["decoder_input_ids"] = ids[:, 3:27]
    return batch


def _full_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every block's output in a full forward, in the order the forward runs them (an
    encoder-decoder's encoder blocks, then its decoder blocks)."""
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for _, b in all_blocks(model)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_each_block_gets_the_inputs_of_a_full_forward(architecture: str) -> None:
    model = tiny_model(architecture, vocab_size=1000)
    batch = _batch(model)
    expected = iter(_full_outputs(model, batch))
    for stack, (prefix, blocks) in enumerate(block_stacks(model)):
        calls = capture_block_inputs(model, [batch], stack=stack)
        assert len(calls.kwargs) == len(blocks) and all(len(k) == 1 for k in calls.kwargs)
        inputs = calls.first
        for index, block in enumerate(blocks):
            following = calls.for_block(index + 1) if index + 1 < len(blocks) else None
            inputs = run_block(block, inputs, None, following)
            torch.testing.assert_close(inputs[0][0], next(expected), rtol=0, atol=1e-5, msg=f"{prefix}.{index}")
    assert next(expected, None) is None


def test_what_t5_blocks_carry_to_the_next_reaches_it() -> None:
    """T5's first block computes the position bias the later ones use: the capture cannot know it
    (no block runs), so the block outputs carry it; without it, block 1 differs."""
    model = tiny_model("t5", vocab_size=1000)
    assert type(block_stacks(model)[0][1][0]).__name__ in CARRIED
    calls = capture_block_inputs(model, [_batch(model)])
    assert calls.for_block(1)[0]["position_bias"] is None
    _, blocks = block_stacks(model)[0]
    after_first = run_block(blocks[0], calls.first, None, calls.for_block(1))
    assert after_first[0][1]["position_bias"] is not None
    carried = run_block(blocks[1], after_first)
    uncarried = run_block(blocks[1], [(after_first[0][0], calls.for_block(1)[0])])
    assert (carried[0][0] - uncarried[0][0]).abs().max() > 1e-3


def test_sliding_and_full_layers_get_their_own_masks() -> None:
    """Gemma 2 alternates sliding-window and full attention: block 1's mask is not block 0's, and
    reusing block 0's (what capturing block 0 alone gave) changes block 1's output."""
    model = tiny_model("gemma2", vocab_size=1000)
    batch = _batch()
    calls = capture_block_inputs(model, [batch])
    masks = [calls.for_block(i)[0]["attention_mask"] for i in range(2)]
    assert masks[0] is not None and masks[1] is not None and not torch.equal(masks[0], masks[1])
    _, blocks = block_list(model)
    hidden = run_block(blocks[0], calls.first, None, calls.for_block(1))
    wrong = run_block(blocks[1], [(hidden[0][0], calls.for_block(0)[0])])
    right = run_block(blocks[1], hidden)
    assert (wrong[0][0] - right[0][0]).abs().max() > 1e-3


def test_a_positional_attention_mask_is_kept() -> None:
    """BERT's encoder passes the attention mask positionally; it reaches every block by name."""
    model = tiny_model("bert", vocab_size=1000)
    calls = capture_block_inputs(model, [_batch()])
    assert all(calls.for_block(i)[0].get("attention_mask") is not None for i in range(2))


@pytest.mark.parametrize("architecture", ["gemma3", "gpt2", "falcon", "t5", "bart"])
def test_calibration_with_nothing_compressed_sees_the_full_forward(architecture: str) -> None:
    model = tiny_model(architecture, vocab_size=1000)
    batch = _batch(model)
    expected = _full_outputs(model, batch)
    seen: list[torch.Tensor] = []

    def compress_block(_name, block, inputs) -> None:
        seen.append(run_block(block, inputs)[0][0])

    calibrate_sequentially(model, [batch], compress_block)
    for index, (got, want) in enumerate(zip(seen, expected, strict=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"block {index}")
