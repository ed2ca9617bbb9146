"""The teacher cache is built without recording an autograd graph (the teacher's activations would otherwise stay alive)."""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import torch
from torch import nn

from squeeze.distill.cache import META_FILE, build_cache


class RecordingTeacher(nn.Module):
    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(vocab, vocab))
        self.grad_enabled: list[bool] = []

    def forward(self, input_ids: torch.Tensor):
        self.grad_enabled.append(torch.is_grad_enabled())
        return types.SimpleNamespace(logits=self.embed[input_ids])


def test_cache_build_records_no_graph(tmp_path: Path) -> None:
    teacher = RecordingTeacher()
    windows = torch.randint(0, 8, (3, 6), generator=torch.Generator().manual_seed(0))
    identity = {"top_k": 4, "temperature": 2.0, "samples": 2, "seed": 0}
    folder = tmp_path / "cache"
    folder.mkdir()
    build_cache(teacher, windows, [0, 1, 2], identity, folder, 2, contextlib.nullcontext)
    assert teacher.grad_enabled == [False, False]  # two batches, neither tracked
    assert (folder / META_FILE).is_file()
