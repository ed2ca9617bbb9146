"""The reference side of a pass's evaluation, recorded before the pass changes the model.

A pass scores its output against its input. Rather than keep a whole second copy of the input
for that, squeeze records what the comparison needs of it before the pass compresses the model
in place:

- a causal LM: the hidden states its last block gives on each evaluation batch (tokens × hidden:
  a few percent of the logits), and a copy of the model without its blocks (embeddings, final
  norm, head), whose blocks are stand-ins that hand over the recorded states, so that the copy's
  own forward turns them into the very logits the whole model gives;
- an encoder-decoder: the same of its decoder; the copy keeps both stacks' ends, with
  stand-ins for the blocks of both (the encoder's pass its embeddings on: the decoder's
  stand-ins ignore the cross-attention input);
- an encoder: the last hidden states themselves (mean pooling needs nothing else);
- the greedy continuations of the generation-agreement prompts.

:class:`RecordedReference` then answers the comparison's calls batch by batch, checking that each
call brings the token ids that were recorded for it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from squeeze.calib.blocks import block_stacks
from squeeze.calib.capture import carried, copy_plain_attributes
from squeeze.evaluate import window_batches
from squeeze.seq2seq import forward_inputs

class _StopAfterBlocks(Exception):
    """Raised by the recording hook: the head's work is done later, from the recorded states."""


class Handover:
    """What the stand-ins hand over: the current batch's recorded hidden states, and the form the
    real blocks returned them in. Records that share a head share one."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None
        self.returns_tuple = False


class _StandIn(nn.Module):
    """In place of one block of a head: the first returns the recorded hidden states of the
    current batch, the others pass them on, in the form the real block returned."""

    def __init__(self, block: nn.Module, handover: Handover, first: bool) -> None:
        super().__init__()
        copy_plain_attributes(block, self)
        self._handover, self._first = handover, first
        self._carried = carried(block)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        hidden = self._handover.current if self._first else hidden_states
        if self._carried:
            # the stack unpacks what a block carries to the next one; stand-ins need none of it
            return (hidden, *(None for _ in self._carried))
        return (hidden,) if self._handover.returns_tuple else hidden


class _NoEmbedding(nn.Module):
    """In place of input embeddings left on disk: zeros of their width (the first stand-in block
    ignores what it is given)."""

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.width, self.dtype = width, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.width, dtype=self.dtype, device=input_ids.device)


def stand_in_blocks(model: nn.Module, handover: Handover) -> nn.Module:
    """``model`` with stand-ins in place of its blocks (changed in place; returned): its forward
    turns the hidden states ``handover`` holds into the model's outputs. Input embeddings still
    on the meta device (a streamed model's, never read for the head) give way to zeros."""
    stacks = block_stacks(model)
    for stack, (prefix, blocks) in enumerate(stacks):
        parent_name, _, attr = prefix.rpartition(".")
        last = stack == len(stacks) - 1  # the recorded states are the last stack's
        stand_ins = nn.ModuleList(_StandIn(block, handover, first=last and i == 0) for i, block in enumerate(blocks))
        setattr(model.get_submodule(parent_name), attr, stand_ins)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding) and embeddings.weight.is_meta:
        dtype = next((p.dtype for p in model.parameters() if not p.is_meta and p.is_floating_point()), torch.float32)
        model.set_input_embeddings(_NoEmbedding(embeddings.embedding_dim, dtype))
    return model


@dataclass
class Generation:
    """The prompts of a generation-agreement check and the reference's greedy continuations."""

    prompts: list[torch.Tensor]
    continuations: list[str]


def _key(input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
    """What tells a recorded batch apart: its token ids (an encoder-decoder's, both halves)."""
    return input_ids if decoder_input_ids is None else torch.cat([input_ids, decoder_input_ids], dim=1)


class RecordedReference(nn.Module):
    """Stands in for the uncompressed model in :func:`squeeze.evaluate.compare_causal` and
    :func:`~squeeze.evaluate.compare_encoder`: called with the token ids of recorded batch i (in
    any order), it returns that batch's logits (causal) or last hidden states (encoder)."""

    def __init__(self, kind: str, handover: Handover | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.ids: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.returns_tuple = False
        self.handover = handover or Handover()
        self.generation: Generation | None = None
        self._head: list[nn.Module] = []  # in a list: not a submodule (its parameters are not the reference's)

    @property
    def slices_logits(self) -> bool:
        """Whether :meth:`logits_at` can give the logits of chosen positions alone: a causal
        record whose head takes ``logits_to_keep`` (transformers' causal LMs do)."""
        return self.kind == "causal" and bool(self._head) and "logits_to_keep" in inspect.signature(self._head[0].forward).parameters

    def logits_at(self, input_ids: torch.Tensor, positions: slice) -> torch.Tensor:
        """The logits at ``positions`` of the recorded batch with these token ids (see
        :attr:`slices_logits`): the head runs on the recorded states, projecting those positions only."""
        keep = torch.arange(positions.start, positions.stop, device=input_ids.device)
        return self.forward(input_ids, logits_to_keep=keep).logits

    @property
    def input_device(self) -> torch.device:
        """Where the token ids go (the comparison asks a model for it)."""
        return self.ids[0].device if self.ids else torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        index = self._find(_key(input_ids, **kwargs))
        if not self._head:
            return SimpleNamespace(last_hidden_state=self.outputs[index])
        self.handover.current, self.handover.returns_tuple = self.outputs[index], self.returns_tuple
        try:
            out = self._head[0](input_ids=input_ids, **kwargs)
            return SimpleNamespace(last_hidden_state=out.last_hidden_state) if self.kind == "encoder" else SimpleNamespace(logits=out.logits)
        finally:
            self.handover.current = None

    def _find(self, ids: torch.Tensor) -> int:
        for index, recorded in enumerate(self.ids):
            if recorded.shape == ids.shape and torch.equal(recorded, ids.to(recorded.device)):
                return index
        raise RuntimeError("the reference was not recorded on these token ids")


def _head_copy(model: nn.Module, recorded: RecordedReference) -> nn.Module:
    """``model`` without its blocks, copied (embeddings, norm, head, rotary tables, config), with
    stand-ins where the blocks were."""
    stacks = [(model.get_submodule(prefix.rpartition(".")[0]), prefix.rpartition(".")[2], blocks) for prefix, blocks in block_stacks(model)]
    stand_in_blocks(model, recorded.handover)
    try:
        return copy.deepcopy(model, memo={id(recorded.handover): recorded.handover})
    finally:
        for parent, attr, blocks in stacks:
            setattr(parent, attr, blocks)


def recorded_states(
    kind: str, ids: list[torch.Tensor], states: list[torch.Tensor], returns_tuple: bool, head: nn.Module,
) -> RecordedReference:
    """A record of a model's last-block hidden ``states`` on the batches ``ids``, answered through
    ``head``: a model whose blocks are :func:`stand_in_blocks` (several records may share it)."""
    _, blocks = block_stacks(head)[-1]
    handover = blocks[0]._handover if isinstance(blocks[0], _StandIn) else None
    if handover is None:
        raise ValueError("the head's blocks must be stand-ins")
    recorded = RecordedReference(kind, handover)
    recorded.ids, recorded.outputs, recorded.returns_tuple = ids, states, returns_tuple
    recorded._head.append(head)
    return recorded


@torch.no_grad()
def record_reference(
    model: nn.Module,
    kind: str,
    windows: torch.Tensor,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> RecordedReference:
    """Record ``model``'s side of a comparison on token ``windows`` [n, L] taken ``batch_size`` at a
    time (the batch size the comparison will use; see the module docstring)."""
    device = next(model.parameters()).device
    recorded = RecordedReference(kind)
    if kind in ("causal", "seq2seq"):
        _, blocks = block_stacks(model)[-1]

        def keep(_module: nn.Module, _args: tuple, output: Any) -> None:
            recorded.returns_tuple = isinstance(output, (tuple, list))
            recorded.outputs.append((output[0] if recorded.returns_tuple else output).detach().clone())
            raise _StopAfterBlocks

        handle = blocks[len(blocks) - 1].register_forward_hook(keep)
        try:
            for batch in window_batches(windows, batch_size):
                inputs = forward_inputs(model, batch.to(device))
                try:
                    model(**inputs)
                except _StopAfterBlocks:
                    pass
                recorded.ids.append(_key(**inputs))
                if on_batch:
                    on_batch(batch.shape[0])
        finally:
            handle.remove()
        recorded._head.append(_head_copy(model, recorded))
    else:
        for batch in window_batches(windows, batch_size):
            ids = batch.to(device)
            recorded.outputs.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.detach().clone())
            recorded.ids.append(ids)
            if on_batch:
                on_batch(batch.shape[0])
    return recorded
