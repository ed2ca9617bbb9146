"""How much memory a quantize or prune pass takes, estimated from the config alone, resident or streamed.

The estimate is a rough peak RSS in bytes, made before anything is loaded from the meta model
(shapes only), so that a run is kept resident, streamed or refused before any long work
(squeeze.chain.check_memory), and every report shows it beside the peak it measured.

Resident, the pass holds the input and the record of what it compares it with (the last block's
hidden states on the evaluation tokens and a copy of everything outside the blocks: embeddings,
final norm, head): the input itself for the first stage; for a later stage the original, loaded
whole, recorded and dropped before the input is loaded (whichever of the two moments is larger
is the peak). Quantizing adds the integer codes beside the float weights (a byte a weight).

Streamed (squeeze.passes.stream), it holds one side of what lies outside the blocks at a time (the
input embeddings when the text goes in, the final norm and head when the logits come out) and
the largest of those tensors again as it is written, one block twice (the block and its
compressed copy), and two evaluation hidden states, the reference's and the output's; a named
reference keeps a head of its own.

Both, while calibrating, hold the inputs and outputs of one block for every calibration window
(streamed with them spilled to disk, of one batch), plus what the method holds (its ``calibration_bytes``: GPTQ and SparseGPT one in_features²
Hessian per Linear of a block, AWQ the captured inputs of its widest layer); evaluation adds a
span of positions of both models' logits and log-softmax for a batch of two, and, resident, the
compressed model's logits of the whole batch (streamed, both sides are recorded states whose head
projects one span at a time). Memory freed after
calibration mostly stays with the process (the allocator keeps it), so calibration and evaluation
add up. On SmolLM2 (magnitude 30% then RTN W4 g64, 4,096 evaluation tokens, 2026-11-30) the
resident estimates were 2% and 10% under the measured peaks (1.79 and 2.09 GiB), so a budget
refusal comes late rather than early.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from squeeze.calib.blocks import all_blocks
from squeeze.evaluate import metric_chunk

PROCESS_BYTES = 700 * 2**20  # python + torch + transformers before any model is loaded


@dataclass(frozen=True)
class PassShape:
    """What the estimate reads of a run: the pass, the method's calibration memory, the text."""

    quantize: bool  # quantize (codes beside the weights) or prune
    method_bytes: int  # the method's calibration_bytes for one block
    calibration_tokens: int
    evaluation_tokens: int
    seq_len: int
    evaluate: bool
    named_reference: bool  # compared with another model than its input (a later recipe stage)
    dtype_bytes: int = 4
    spilled: bool = False  # streamed with the calibration activations on disk (squeeze.calib.spill)


def _parameters(model: nn.Module) -> tuple[int, int, int]:
    """All parameters, those outside the blocks, and those of the largest block (meta models
    are enough; tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    blocks = [block for _, block in all_blocks(model)]
    inside = sum(p.numel() for block in blocks for p in block.parameters())
    largest = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
    return total, total - inside, largest


def _shared(model: nn.Module, shape: PassShape, whole_logits: bool) -> int:
    """Calibration and evaluation memory; ``whole_logits``: the compressed model's logits of a
    whole batch are held (resident)."""
    config = model.config
    hidden = getattr(config, "hidden_size", 0)
    vocab = getattr(config, "vocab_size", 0)
    calibration = 0
    if shape.calibration_tokens:
        # a block's inputs and outputs for every window; spilled, a batch of two windows of each
        tokens = 2 * shape.seq_len if shape.spilled else shape.calibration_tokens
        calibration = 2 * tokens * hidden * shape.dtype_bytes + shape.method_bytes
    # a batch of two windows, float32 (squeeze.evaluate.compare_causal): a span of positions
    # in five vocabulary-wide tensors (both logits, both log-softmaxes, the KL terms), and resident
    # the compressed model's logits of every position
    span = metric_chunk(2, vocab) if vocab else 0
    evaluation = 2 * (5 * span + (shape.seq_len if whole_logits else 0)) * vocab * 4 if shape.evaluate else 0
    return PROCESS_BYTES + calibration + evaluation


def resident_bytes(model: nn.Module, original: nn.Module, shape: PassShape) -> int:
    """The estimated peak of the pass on ``model`` holding it whole (see the module docstring)."""
    params, _, _ = _parameters(model)
    held = params * shape.dtype_bytes
    if shape.evaluate:
        compared = original if shape.named_reference else model
        compared_params, compared_outside, _ = _parameters(compared)
        hidden = getattr(model.config, "hidden_size", 0)
        record = (compared_outside + shape.evaluation_tokens * hidden) * shape.dtype_bytes
        held = max(held + record, compared_params * shape.dtype_bytes if shape.named_reference else 0)
    codes = params if shape.quantize else 0
    return _shared(model, shape, whole_logits=True) + held + codes


def _sides(model: nn.Module) -> tuple[int, int]:
    """Parameters of the larger side of what lies outside the blocks (all but the head, or all but
    the input embeddings; tied ones are both), and of its largest tensor."""
    _, outside, _ = _parameters(model)
    ends = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        ends.append({id(p): p.numel() for p in module.parameters()} if isinstance(module, nn.Module) else {})
    inputs, outputs = ends
    without_head = outside - sum(n for i, n in outputs.items() if i not in inputs)
    without_inputs = outside - sum(n for i, n in inputs.items() if i not in outputs)
    inside = {id(p) for _, block in all_blocks(model) for p in block.parameters()}
    largest = max((p.numel() for p in model.parameters() if id(p) not in inside), default=0)
    return max(without_head, without_inputs), largest


def read_in_blocks_bytes(model: nn.Module, dtype_bytes: int, blocks: int = 1, written: bool = False) -> int:
    """The weights held while ``model`` is read one part at a time: the larger side of what lies
    outside the blocks, ``blocks`` blocks, and (``written``: a pass writing them out) the largest
    tensor outside the blocks again, as it is written."""
    _, _, block = _parameters(model)
    side, largest = _sides(model)
    return (side + blocks * block + (largest if written else 0)) * dtype_bytes


def streamed_bytes(model: nn.Module, original: nn.Module, shape: PassShape) -> int:
    """The estimated peak of the pass on ``model`` streamed one block at a time."""
    held = read_in_blocks_bytes(model, shape.dtype_bytes, blocks=2, written=True)  # a block and its compressed copy
    if shape.evaluate:
        hidden = getattr(model.config, "hidden_size", 0)
        held += 2 * shape.evaluation_tokens * hidden * shape.dtype_bytes
        if shape.named_reference:
            held += _sides(original)[0] * shape.dtype_bytes
    return _shared(model, shape, whole_logits=False) + held


def block_bytes(model: nn.Module, dtype_bytes: int = 4) -> int:
    """One block's weights in the compute dtype: the least a streamed pass holds."""
    return _parameters(model)[2] * dtype_bytes
