"""Greedy generation with one transformer block in memory at a time.

Greedy decoding needs every block for every new token, so a model streamed block by block cannot
be held whole for it. Here the model's own forward runs as usual (its masks, rotary tables and
KV cache are transformers'), but each block is read from disk when the forward reaches it and
released when it returns. The prompts go through together, one batch per new token, so each
token costs one read of the weights (from the page cache, once the first has warmed it) for all
prompts, not one per prompt.

Prompts of equal length (squeeze's generation-agreement prompts all are) batch without padding,
so every row computes what it computes alone; prompts of other lengths go in batches of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from squeeze.generate import cache_arguments, returned_cache, takes_logits_to_keep
from squeeze.stream.lazy import LazyModel
from squeeze.weightcache import dequantize_each_call


@contextmanager
def blocks_on_demand(lazy: LazyModel) -> Iterator[None]:
    """Within this scope each of ``lazy``'s blocks, and an untied head, is materialised when its
    forward starts and released when it returns; the rest of what lies outside the blocks (the
    input embeddings, the final norm) is held for the whole scope. So at most the input side and
    one block, or the input side and the head, are in memory: on an 8B Llama the head alone is
    2 GiB in float32."""
    lazy.materialise_outside("input")
    handles = []
    head_only = [n for n in lazy.outside("all") if n not in set(lazy.outside("input"))]
    try:
        parts = [(lazy.model.get_submodule(name), lambda index=index: lazy.block(index)) for index, name in enumerate(lazy.blocks)]
        if head_only:
            parts.append((lazy.model.get_output_embeddings(), lambda: lazy.materialise(head_only)))
        for module, read in parts:
            handles.append(module.register_forward_pre_hook(lambda _m, _a, read=read: read() and None))
            handles.append(module.register_forward_hook(lambda part, _a, _o: lazy.release(part)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        lazy.release_outside()


@torch.inference_mode()
def streamed_greedy_continuations(
    lazy: LazyModel,
    tokenizer,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[str]:
    """The greedy continuation of each prompt [1, n] by ``lazy``'s causal LM, read one block at a
    time (at most ``max_new_tokens`` tokens, stopping after ``eos_token_id``), decoded without
    special tokens: what :func:`squeeze.generate.greedy_continuations` gives on the whole model.
    ``on_token(1)`` after each new token of a batch."""
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"each prompt is input_ids [1, n]; got shape {tuple(prompt.shape)}")
        by_length.setdefault(prompt.shape[1], []).append(index)
    new: list[list[int]] = [[] for _ in prompts]
    # a block runs once per token: keeping its dequantized weights would keep every block's
    with blocks_on_demand(lazy), dequantize_each_call():
        for rows in by_length.values():
            batch = torch.cat([prompts[i] for i in rows]).to(lazy.device)
            for row, ids in zip(rows, _greedy_batch(lazy.model, batch, max_new_tokens, eos_token_id, on_token)):
                new[row] = ids
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


def _greedy_batch(
    model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None, on_token: Callable[[int], None] | None,
) -> list[list[int]]:
    """Greedy new tokens for each row of ``ids`` [b, n] (no padding), each row cut after its EOS."""
    rows = ids.shape[0]
    new: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    past = None
    last_only = {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, **cache_arguments(model, past), **last_only)
        past = returned_cache(out)
        tokens = out.logits[:, -1].argmax(dim=-1)
        for row in range(rows):
            if not done[row]:
                new[row].append(int(tokens[row]))
                done[row] = eos_token_id is not None and new[row][-1] == eos_token_id
        if on_token:
            on_token(1)
        if all(done):
            break
        ids = tokens.reshape(rows, 1)
    return new
