"""Layer-sequential calibration: one transformer block at a time.

What every block receives is captured once for every calibration batch (squeeze.calib.capture:
block 0's hidden states and each block's own keyword arguments, without running a block). Then,
for each block in turn: run it on its inputs while hooks collect statistics, compress it, run the
*compressed* block to make the next block's inputs, and drop the old ones.
Peak memory is one block's worth of work plus the calibration activations, and each block is
calibrated on what the compressed blocks before it really produce.

Time spent running calibration text is counted on a :class:`CalibrationClock` the caller owns
(one per run), so two runs never add to each other's count.

Where the blocks come from is the caller's choice: by default they are the model's own, resident;
inside :func:`streamed_blocks` a :class:`BlockSource` hands each block over when its turn comes
and takes it back when it is done (squeeze.passes.stream reads blocks from disk and writes them
out that way), so every method built on this pipeline streams without knowing it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, ContextManager, Protocol

import torch
from torch import nn

from squeeze.calib.blocks import block_stacks
from squeeze.calib.capture import BlockCalls, BlockInputs, capture_block_calls, next_arguments
from squeeze.calib.parallel import share
from squeeze.calib.spill import inputs_like, release_inputs
from squeeze.errors import SqueezeError
from squeeze.linears import all_experts_calibrating
from squeeze.weightcache import reuse_dequantized


class CalibrationClock:
    """Seconds spent running calibration text through the model: capturing block inputs, the
    observation passes that collect statistics, and producing each block's outputs."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


def _timing(clock: CalibrationClock | None) -> ContextManager[None]:
    return clock.timing() if clock is not None else nullcontext()


class BlockSource(Protocol):
    """Hands out the blocks of a model one at a time (see the module docstring)."""

    def onload(self, index: int) -> nn.Module:
        """Block ``index``, ready to run; called after the block inputs were captured."""

    def offload(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is compressed and its outputs computed: take it back."""


_SOURCE: ContextVar[BlockSource | None] = ContextVar("block_source", default=None)


@contextmanager
def streamed_blocks(source: BlockSource) -> Iterator[None]:
    """Within this context, :func:`calibrate_sequentially` takes its blocks from ``source``."""
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], clock: CalibrationClock | None = None, stack: int = 0,
) -> BlockCalls:
    """What every block of stack ``stack`` receives on each batch in a full forward
    (squeeze.calib.capture), timed on ``clock``."""
    with _timing(clock):
        return capture_block_calls(model, batches, stack)


class StopBlock(Exception):
    """Raised by an observer of :func:`run_block_observed` once it has seen all it needs of the
    current call: the rest of the block's forward on that input is skipped."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: BlockInputs, clock: CalibrationClock | None = None, next_kwargs: list[dict[str, Any]] | None = None,
    hidden_states: BlockInputs | None = None,
) -> BlockInputs:
    """The block's outputs for every captured input, paired with ``next_kwargs`` (the next block's
    keyword arguments, one per batch; default: the same as this block's) and with what the block's
    output carries to the next one (squeeze.calib.capture.next_arguments). ``hidden_states``
    (another stream of this block's inputs, e.g. the unquantized model's) replaces the inputs'
    hidden states, batch for batch, keeping their keyword arguments."""
    outputs = inputs_like(inputs)
    with _timing(clock), reuse_dequantized():
        for index, (hidden, kwargs) in enumerate(inputs):
            if hidden_states is not None:
                hidden = hidden_states[index][0]
            output = block(hidden, **kwargs)
            following = kwargs if next_kwargs is None else next_kwargs[index]
            outputs.append((_hidden(output), next_arguments(block, output, following)))
    return outputs


@torch.no_grad()
def run_block_observed(
    block: nn.Module,
    inputs: BlockInputs,
    modules: dict[str, nn.Module],
    observe: Callable[[str, nn.Module, torch.Tensor], None],
    before_call: Callable[[], None] | None = None,
    clock: CalibrationClock | None = None,
) -> bool:
    """Run ``block`` on every captured input, calling ``observe(name, module, x)`` with the input
    ``x`` of each listed module. ``before_call`` runs before each input, for per-call state (layers
    that read the very same tensor, like q/k/v, are recognised within one call). An observer may
    raise :class:`StopBlock` to end the current call there. Returns whether every call ran to its
    end."""
    handles = [
        m.register_forward_pre_hook(lambda module, args, name=n: observe(name, module, args[0]))
        for n, m in modules.items()
    ]
    complete = True
    try:
        with _timing(clock), reuse_dequantized():
            for hidden, kwargs in inputs:
                if before_call:
                    before_call()
                try:
                    block(hidden, **kwargs)
                except StopBlock:
                    complete = False
    finally:
        for h in handles:
            h.remove()
    return complete


@torch.no_grad()
def calibrate_sequentially(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    compress_block: Callable[[str, nn.Module, BlockInputs], None],
    on_block: Callable[[str], None] | None = None,
    clock: CalibrationClock | None = None,
) -> float:
    """Call ``compress_block(name, block, inputs)`` for each block in order, feeding each block the
    outputs of the already-compressed blocks before it. ``compress_block`` changes the block in
    place (it may run it on ``inputs`` as often as it needs). Returns the seconds spent running
    calibration text in this call (capture, block outputs, and the observation passes that
    ``compress_block`` times on the same ``clock``); the rest is the method's own work.
    Mixture-of-experts blocks run every expert on every token, so that each expert's statistics
    come from all the calibration text (squeeze.linears.all_experts_calibrating)."""
    clock = clock if clock is not None else CalibrationClock()
    start = clock.seconds
    with all_experts_calibrating():
        return _calibrate(model, batches, compress_block, on_block, clock, start)


def _calibrate(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], compress_block: Callable[[str, nn.Module, BlockInputs], None],
    on_block: Callable[[str], None] | None, clock: CalibrationClock, start: float,
) -> float:
    batches = share(list(batches))  # under data_parallel, this process's share (squeeze.calib.parallel)
    stacks = block_stacks(model)
    source = _SOURCE.get()
    if source is not None and len(stacks) > 1:
        raise SqueezeError(f"{type(model).__name__} has an encoder and a decoder: its blocks cannot be streamed yet")
    # an encoder-decoder's decoder stack is captured once its encoder is compressed: the
    # decoder's cross-attention reads what the compressed encoder gives
    for stack, (prefix, blocks) in enumerate(stacks):
        _calibrate_stack(model, stack, prefix, blocks, batches, compress_block, on_block, clock, source)
    return clock.seconds - start


def _calibrate_stack(
    model: nn.Module, stack: int, prefix: str, blocks: nn.ModuleList, batches: list[dict[str, torch.Tensor]],
    compress_block: Callable[[str, nn.Module, BlockInputs], None], on_block: Callable[[str], None] | None,
    clock: CalibrationClock, source: BlockSource | None,
) -> None:
    calls = capture_block_inputs(model, batches, clock, stack)
    inputs = calls.first
    if not inputs:
        raise SqueezeError("no calibration batches reached the model")
    for index in range(len(blocks)):
        name = f"{prefix}.{index}"
        block = source.onload(index) if source is not None else blocks[index]
        compress_block(name, block, inputs)
        following = calls.for_block(index + 1) if index + 1 < len(blocks) else None
        outputs = run_block(block, inputs, clock, following)
        release_inputs(inputs)
        inputs = outputs
        if source is not None:
            source.offload(index, block)
        if on_block:
            on_block(name)
    release_inputs(inputs)
