"""Greedy generation with one transformer block in memory at a time.

Greedy decoding needs every block for every new token, so a model streamed block by block cannot
be held whole for it. Here the model's own forward runs as usual (its masks, rotary tables and
KV cache are transformers'), but each block is read from disk when the forward reaches it and
released when it returns. The prompts go through together, one batch per new token, so each
token costs one read of the weights (from the page cache, once the first has warmed it) for all
prompts, not one per prompt.

Prompts of equal length (squeeze's generation-agreement prompts all are) batch without padding,
so no row sees a pad or another row's tokens; prompts of other lengths go in batches of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from squeeze.generate import greedy_ids
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
    # a block runs once per token: keeping its dequantized weights would keep every block's
    with blocks_on_demand(lazy), dequantize_each_call():
        ids = greedy_ids(lazy.model, [p.to(lazy.device) for p in prompts], max_new_tokens, eos_token_id, on_token=on_token)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
