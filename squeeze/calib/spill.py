"""Calibration activations kept on disk instead of in memory, for a model whose block inputs alone
are more than the memory budget allows (an 8B model on 128 x 2048 calibration tokens holds
4 GiB of float32 hidden states per copy, and a block's inputs and outputs are two copies).

:class:`SpilledInputs` stands in for the list of ``(hidden states, keyword arguments)`` pairs
that :mod:`squeeze.calib.pipeline` passes from block to block: each batch's hidden states go to
a safetensors file of their own as they are appended and are read back one batch at a time
when iterated, so only the batch being worked on is in memory. The keyword arguments (masks,
position tables: the same for every block, and small) stay in memory. Within
:func:`spilled_calibration`, the pipeline keeps its activations this way.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from squeeze.tensorfiles import save_tensors_file

_SPILL_ROOT: ContextVar[Path | None] = ContextVar("spill_root", default=None)


class SpilledInputs:
    """Block inputs, one safetensors file per batch in a folder of their own under ``root`` (see
    the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = Path(tempfile.mkdtemp(prefix="inputs-", dir=self.root))
        self.kwargs: list[dict[str, Any]] = []
        self.devices: list[torch.device] = []

    def append(self, item: tuple[torch.Tensor, dict[str, Any]]) -> None:
        hidden, kwargs = item
        save_tensors_file({"hidden": hidden.detach().contiguous().cpu()}, self._file(len(self.kwargs)))
        self.kwargs.append(kwargs)
        self.devices.append(hidden.device)

    def __len__(self) -> int:
        return len(self.kwargs)

    def __bool__(self) -> bool:
        return bool(self.kwargs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= index < len(self.kwargs):
            raise IndexError(index)
        return load_file(str(self._file(index)), device=str(self.devices[index]))["hidden"], self.kwargs[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for index in range(len(self.kwargs)):
            yield self[index]

    def empty_like(self) -> SpilledInputs:
        """A new, empty store beside this one (for the next block's inputs)."""
        return SpilledInputs(self.root)

    def discard(self) -> None:
        """Delete the files (the store is empty after)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.kwargs, self.devices = [], []

    def _file(self, index: int) -> Path:
        return self.folder / f"{index:06d}.safetensors"


def new_inputs() -> list | SpilledInputs:
    """An empty store for block inputs: on disk within :func:`spilled_calibration`, else a list."""
    root = _SPILL_ROOT.get()
    return [] if root is None else SpilledInputs(root)


def inputs_like(inputs: list | SpilledInputs) -> list | SpilledInputs:
    """An empty store of the same kind as ``inputs``."""
    return inputs.empty_like() if isinstance(inputs, SpilledInputs) else []


def release_inputs(inputs: list | SpilledInputs) -> None:
    """Drop what ``inputs`` holds (deleting its files when spilled)."""
    if isinstance(inputs, SpilledInputs):
        inputs.discard()


@contextmanager
def spilled_calibration(parent: Path | None = None) -> Iterator[Path]:
    """Within this context, calibration activations are kept on disk, in a temporary folder under
    ``parent`` (default: the system's temporary folder), deleted at the end."""
    root = Path(tempfile.mkdtemp(prefix="squeeze-calibration-", dir=parent))
    token = _SPILL_ROOT.set(root)
    try:
        yield root
    finally:
        _SPILL_ROOT.reset(token)
        shutil.rmtree(root, ignore_errors=True)
