"""A model whose weights stay on disk until their turn: built on the meta device from its config,
one part (a transformer block, or everything outside the blocks) materialised at a time from
its safetensors files, read memory-mapped, and released back to the meta device after.

:class:`CheckpointTensors` reads single files and sharded folders (through the index);
:class:`LazyModel` counts what is materialised, so a test can hold it to one part at a time.
"""

from __future__ import annotations

import ctypes
import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from squeeze.calib.blocks import block_list
from squeeze.errors import SqueezeError


class CheckpointTensors:
    """The tensors of a safetensors checkpoint folder by name, each read only when asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.files.update({name: file for name in handle.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed again: a file left open keeps
        every page read from it mapped, and counted in the process's memory."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), "pt") as handle:
                out.update({name: handle.get_tensor(name) for name in wanted})
        return out


class LazyModel:
    """``model`` (on the meta device) with its weights in ``tensors``; parts are materialised in
    ``dtype`` on ``device`` and released one at a time. ``peak_parts`` is the most parts that were
    materialised at once."""

    def __init__(self, model: nn.Module, tensors: CheckpointTensors, dtype: torch.dtype, device: str = "cpu") -> None:
        self.model, self.tensors, self.dtype, self.device = model, tensors, dtype, device
        self.prefix, blocks = block_list(model)
        self.blocks = [f"{self.prefix}.{i}" for i in range(len(blocks))]
        self.live = 0
        self.peak_parts = 0
        names = list(dict(model.named_parameters()))
        missing = [n for n in names if n not in tensors]
        if missing:
            raise SqueezeError(f"cannot stream {tensors.folder}: its checkpoint has no tensor {missing[0]} (names differ from the model's)")

    def outside(self) -> list[str]:
        """Names of the parameters and persistent buffers outside the blocks, a tied weight once
        (under its first name)."""
        inside = f"{self.prefix}."
        seen: set[int] = set()
        names = []
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name.startswith(inside) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            names.append(name)
        return names

    def materialise(self, names: list[str]) -> None:
        """Read the named parameters and persistent buffers from disk into the model."""
        # a tied weight is materialised through its owner; a buffer the checkpoint omits stays as built
        stored_tensors = self.tensors.read([n for n in names if n in self.tensors])
        for name, stored in stored_tensors.items():
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            value = stored.to(device=self.device, dtype=self.dtype if stored.is_floating_point() else None)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
        self.live += 1
        self.peak_parts = max(self.peak_parts, self.live)

    def block(self, index: int) -> nn.Module:
        """Block ``index``, materialised."""
        module = self.model.get_submodule(self.blocks[index])
        self.materialise([f"{self.blocks[index]}.{n}" for n in module.state_dict(keep_vars=True)])
        return module

    @contextmanager
    def without_blocks(self) -> Iterator[None]:
        """The model with an empty block list while the block runs (e.g. to list what lies outside)."""
        parent_name, _, attr = self.prefix.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        blocks = getattr(parent, attr)
        setattr(parent, attr, nn.ModuleList())
        try:
            yield
        finally:
            setattr(parent, attr, blocks)

    def release(self, module: nn.Module) -> None:
        """Give ``module``'s memory back: its tensors go to the meta device, and the process
        returns the freed memory to the system (see :func:`return_freed_memory`)."""
        module.to("meta")
        self.live -= 1
        return_freed_memory()


def _trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _trim()


def return_freed_memory() -> None:
    """Collect garbage, then (glibc) hand freed heap memory back to the system. Without it, a
    stream of block-sized tensors freed one after another leaves the process holding a growing
    heap: on a 16-block model, 1.8 GB peak instead of 0.9 GB."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
