"""What each transformer block receives in a full forward, captured without running any block.

Block-by-block work (calibration, streamed evaluation) runs one block at a time, so it must feed
every block exactly what the whole model would: the hidden states, and keyword arguments that
are not the same for every block in every architecture. Gemma 2/3 and Mistral-style models give
sliding-window layers one attention mask and full layers another, and some models give each layer
type its own rotary tables. Recording block 0's arguments and reusing them for all blocks gets
those layers wrong.

So the model's forward runs with every block of one stack stood in for by a recorder: the
recorders pass the hidden states through untouched and record the arguments each block is called
with (by name, the positional ones too), and the last raises to stop the forward before the head.
Only the embeddings and the model's own mask and position code run; no block's weights are read (a
streamed model's blocks can stay on disk). In an encoder-decoder, the decoder's stack is captured
after the encoder's blocks are done: the forward runs the encoder whole, so the decoder's
cross-attention gets the encoder's output.

Some blocks hand the next one more than hidden states: T5's first block computes the relative
position bias, and its stack passes it on to every later block (``CARRIED``). A recorder cannot
know it, so the capture leaves it empty and :func:`next_arguments` fills it in from a real block's
output when the blocks run.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from squeeze.calib.blocks import block_stacks
from squeeze.calib.spill import SpilledInputs, new_inputs, release_inputs

# one (hidden states, keyword arguments) pair per calibration batch; on disk inside
# squeeze.calib.spill.spilled_calibration
BlockInputs = list[tuple[torch.Tensor, dict[str, Any]]] | SpilledInputs

# arguments about the key/value cache: block-by-block work never keeps one
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")

# plain attributes a stand-in copies from the block it replaces: a model's forward may read some of
# them (``attention_type`` picks the mask of a sliding-window layer)
_PLAIN = (str, int, float, bool, type(None))

# block class → the arguments its stack passes from a block's outputs 1, 2, ... to the next block
CARRIED: dict[str, tuple[str, ...]] = {
    name: ("position_bias", "encoder_decoder_position_bias") for name in ("T5Block", "MT5Block")
}


def carried(block: nn.Module) -> tuple[str, ...]:
    """What ``block``'s stack passes from its outputs to the next block (see ``CARRIED``)."""
    return CARRIED.get(type(block).__name__, ())


def next_arguments(block: nn.Module, output: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The next block's keyword arguments ``kwargs``, with what ``block``'s ``output`` carries to it."""
    names = carried(block)
    if not names or not isinstance(output, (tuple, list)):
        return kwargs
    return {**kwargs, **dict(zip(names, output[1:]))}


def copy_plain_attributes(block: nn.Module, stand_in: nn.Module) -> None:
    """Give ``stand_in`` the plain public attributes of ``block`` (see ``_PLAIN``)."""
    for key, value in vars(block).items():
        if not key.startswith("_") and key != "training" and isinstance(value, _PLAIN):
            setattr(stand_in, key, value)


class _StopForward(Exception):
    """Raised by the last recorder: nothing past the blocks needs to run."""


@dataclass
class BlockCalls:
    """The inputs of block 0 for each batch, and the keyword arguments of every block.

    ``kwargs[i][b]`` are block i's arguments for batch b (``kwargs[0][b]`` is the dictionary in
    ``first[b]``). Arguments that are the same tensor for every block are one shared object, so
    holding them per block costs nothing.
    """

    first: BlockInputs
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)

    def for_block(self, index: int) -> list[dict[str, Any]]:
        """Block ``index``'s keyword arguments, one dictionary per batch."""
        return self.kwargs[index]


class _Recorder(nn.Module):
    def __init__(self, block: nn.Module, index: int, last: bool, calls: BlockCalls, wrap: bool) -> None:
        super().__init__()
        copy_plain_attributes(block, self)
        self._signature = inspect.signature(block.forward)
        self._index, self._last, self._calls, self._wrap = index, last, calls, wrap
        self._carried = carried(block)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind_partial(*args, **kwargs)
        named = dict(bound.arguments)
        # a ``**kwargs`` parameter binds as one dictionary: spread it out
        for name, parameter in self._signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in named:
                named.update(named.pop(name))
        hidden_name = next(iter(self._signature.parameters))
        hidden = named.pop(hidden_name)
        for key in _CACHE_ARGUMENTS:
            named.pop(key, None)
        if "use_cache" in self._signature.parameters:
            named["use_cache"] = False
        if self._index == 0:
            self._calls.first.append((hidden, named))
        self._calls.kwargs[self._index].append(named)
        if self._last:
            raise _StopForward
        if self._carried:
            return (hidden, *(named.get(name) for name in self._carried))
        return (hidden,) if self._wrap else hidden


def _record(model: nn.Module, stack: int, batches: list[dict[str, torch.Tensor]], wrap: bool) -> BlockCalls:
    prefix, blocks = block_stacks(model)[stack]
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    calls = BlockCalls(first=new_inputs(), kwargs=[[] for _ in blocks])
    recorders = nn.ModuleList(
        _Recorder(block, i, i == len(blocks) - 1, calls, wrap) for i, block in enumerate(blocks)
    )
    setattr(parent, attr, recorders)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False) if _accepts_use_cache(model) else model(**batch)
            except _StopForward:
                pass
    except BaseException:
        release_inputs(calls.first)
        raise
    finally:
        setattr(parent, attr, blocks)
    return calls


@torch.no_grad()
def capture_block_calls(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], stack: int = 0) -> BlockCalls:
    """Every block's inputs on each batch, as a full forward of ``model`` would give them (see the
    module docstring): block 0's hidden states, and every block's keyword arguments, recorded
    without running any block of stack ``stack`` (squeeze.calib.blocks.block_stacks)."""
    batches = list(batches)
    if not batches:
        return BlockCalls(first=new_inputs())
    # the model's loop may use a block's output as the hidden states or take its first item: a
    # recorder returning the wrong form makes the next one fail, so try the other form
    try:
        return _record(model, stack, batches, wrap=False)
    except (TypeError, IndexError, RuntimeError, ValueError, AttributeError):
        pass
    return _record(model, stack, batches, wrap=True)


def _accepts_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) or hasattr(config, "use_cache")
