"""A distillation teacher read from disk one block at a time (``squeeze distill --stream-teacher``).

The teacher is never whole in memory. Its logits reach training only through the teacher cache:
each cache shard's windows (squeeze.distill.cache.SHARD_WINDOWS of them) are streamed through the
teacher's blocks (squeeze.passes.stream) and turned into logits by its head, so memory holds one
block, the head, and one shard's hidden states. A ``layers:`` student copies only the blocks it
keeps; a ``width:`` student is built from the config. The final evaluation streams the teacher over
the evaluation windows the same way, and its greedy continuations for generation agreement one
block at a time for every new token (squeeze.stream.generation).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager

import torch
from torch import nn

from squeeze.distill.cache import SHARD_WINDOWS
from squeeze.distill.student import StudentSpec, keep_blocks, narrow_model
from squeeze.models import LoadedModel, ModelSource, load_tokenizer
from squeeze.models.load import stored_dtype
from squeeze.passes.stream import lazy_model, stream_states, streamed_continuations
from squeeze.progress import Progress
from squeeze.stream.reference import Generation, Handover, RecordedReference, stand_in_blocks


class StreamedTeacher:
    """The teacher of ``source``: its tokenizer and config at once, its weights only when asked."""

    def __init__(self, source: ModelSource, dtype: torch.dtype, device: str) -> None:
        self.source, self.dtype, self.device = source, dtype, device
        self.lazy = lazy_model(source, dtype, device)
        model = self.lazy.model
        self.loaded = LoadedModel(model, load_tokenizer(source), source, model.config, stored_dtype(source))
        self._head: nn.Module | None = None

    def student(self, spec: StudentSpec, seed: int) -> nn.Module:
        """The student a ``layers:`` or ``width:`` spec describes, in float32 on the device; a
        ``layers:`` student's blocks and everything outside them are read for it and dropped again."""
        if spec.kind == "width":
            return narrow_model(self.lazy.model, spec.width, seed).to(device=self.device, dtype=torch.float32)
        self.lazy.materialise_outside()
        blocks = [self.lazy.block(i) for i in spec.layers]
        student = keep_blocks(self.lazy.model, spec.layers).to(device=self.device, dtype=torch.float32)
        for block in blocks:
            self.lazy.release(block)
        self.lazy.release_outside()
        return student

    def head(self) -> nn.Module:
        """The teacher's head (final norm, output layer) with stand-ins for its blocks: a second
        meta model over the same files, so the streamed one keeps its blocks."""
        if self._head is None:
            head = lazy_model(self.source, self.dtype, self.device)
            head.materialise_outside("output")
            self._head = stand_in_blocks(head.model, Handover())
        return self._head

    def outputs(
        self, batches: list[torch.Tensor], progress: Progress, label: str, context: Callable[[], ContextManager[object]] = nullcontext,
    ) -> RecordedReference:
        """The teacher's logits on ``batches``, streamed (each block inside ``context()``)."""
        return stream_states(self.lazy, "causal", batches, progress, label, context).record(self.head())

    def continuations(self, prompts: list[torch.Tensor], max_new_tokens: int, progress: Progress) -> Generation:
        """The teacher's greedy continuations of ``prompts`` [1, n], read one block at a time for
        every new token."""
        texts = streamed_continuations(
            self.source, self.loaded.tokenizer, prompts, max_new_tokens, self.dtype, self.device, progress, "the teacher",
        )
        return Generation(prompts, texts)

    def cache_teacher(
        self, windows: torch.Tensor, batch_size: int, progress: Progress, context: Callable[[], ContextManager[object]],
    ) -> Callable[[list[int]], nn.Module]:
        """For squeeze.distill.cache.build_cache: the teacher of one shard's window ids, batched as
        the cache batches them."""

        def shard(ids: list[int]) -> nn.Module:
            assert len(ids) <= SHARD_WINDOWS
            batches = [windows[ids[start : start + batch_size]].to(self.device) for start in range(0, len(ids), batch_size)]
            return self.outputs(batches, progress, f"teacher, block by block ({len(ids)} windows)", context)

        return shard
