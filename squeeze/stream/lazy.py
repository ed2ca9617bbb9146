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
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from squeeze.calib.blocks import block_list
from squeeze.errors import SqueezeError
from squeeze.formats.compressed_tensors import Decoder
from squeeze.formats.sparse import BITMASK_PARTS, decode_bitmask_state
from squeeze.linears import stored_tensor


class CheckpointTensors:
    """The tensors of a safetensors checkpoint folder by name, each read only when asked for.

    A weight stored in compressed-tensors' sparse-bitmask layout (a squeeze prune output) is
    listed under its plain ``weight`` name and decoded to the dense tensor when read."""

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
        # a tensor of the model the checkpoint stores encoded: the stored tensors it is decoded from, and how
        self.encoded: dict[str, Decoder] = {}
        for name in [n for n in self.files if n.endswith(".bitmask")]:
            layer = name.removesuffix(".bitmask")
            parts = [f"{layer}.{part}" for part in BITMASK_PARTS]
            self.encoded[f"{layer}.weight"] = (parts, _bitmask_decoder(layer, parts))

        self.aliases: dict[str, str] = {}  # a model's name → the checkpoint's, where they differ

    def rename_like(self, model_type: str | None, names: list[str]) -> None:
        """Find the checkpoint's tensor for each of ``names`` missing from it under the older name
        transformers renames on loading (Mixtral's ``block_sparse_moe`` is its ``mlp``)."""
        renamings = [
            (target, source)
            for conversion in (get_checkpoint_conversion_mapping(model_type) or [] if model_type else [])
            if type(conversion).__name__ == "WeightRenaming"
            for source, target in zip(conversion.source_patterns, conversion.target_patterns)
            if re.fullmatch(r"[\w.]+", source) and re.fullmatch(r"[\w.]+", target)  # plain text, not a pattern
        ]
        for name in names:
            for new, old in renamings:
                if name not in self and new in name and name.replace(new, old) in self:
                    self.aliases[name] = name.replace(new, old)

    def __contains__(self, name: str) -> bool:
        return name in self.files or name in self.encoded or name in self.aliases

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed again: a file left open keeps
        every page read from it mapped, and counted in the process's memory."""
        found = self._read([self.aliases.get(n, n) for n in names])
        return {name: found[self.aliases.get(name, name)] for name in names} if self.aliases else found

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        stored = {part for name in names for part in (self.encoded[name][0] if name in self.encoded else [name])}
        by_file: dict[Path, list[str]] = {}
        for name in sorted(stored):
            by_file.setdefault(self.files[name], []).append(name)
        raw = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), "pt") as handle:
                raw.update({name: handle.get_tensor(name) for name in wanted})
        out = {}
        for name in names:
            if name in self.encoded:
                parts, decode = self.encoded[name]
                out[name] = decode([raw[part] for part in parts])
            else:
                out[name] = raw[name]
        return out

    def empty(self, name: str) -> torch.Tensor:
        """A tensor on the meta device with the shape and dtype the checkpoint stores ``name`` in (nothing is read)."""
        with safe_open(str(self.files[name]), "pt") as handle:
            stored = handle.get_slice(name)
            return torch.empty(stored.get_shape(), dtype=SAFETENSORS_DTYPES[stored.get_dtype()], device="meta")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _bitmask_decoder(layer: str, parts: list[str]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The dense weight of ``layer`` from its sparse-bitmask tensors (``parts``, in that order)."""
    return lambda tensors: decode_bitmask_state(dict(zip(parts, tensors)))[f"{layer}.weight"]


class LazyModel:
    """``model`` (on the meta device) with its weights in ``tensors``; parts are materialised in
    ``dtype`` on ``device`` and released one at a time. ``peak_parts`` is the most parts that were
    materialised at once."""

    def __init__(self, model: nn.Module, tensors: CheckpointTensors, dtype: torch.dtype, device: str = "cpu") -> None:
        self.model, self.tensors, self.dtype, self.device = model.eval(), tensors, dtype, device  # no dropout
        map_large_allocations()  # a heap that fragments grows with the number of blocks streamed
        self.prefix, blocks = block_list(model)
        self.blocks = [f"{self.prefix}.{i}" for i in range(len(blocks))]
        self.live = 0
        self.peak_parts = 0
        names = list(dict(model.named_parameters()))
        tensors.rename_like(getattr(getattr(model, "config", None), "model_type", None), [n for n in names if n not in tensors])
        missing = [n for n in names if n not in tensors]
        if missing:
            raise SqueezeError(f"cannot stream {tensors.folder}: its checkpoint has no tensor {missing[0]} (names differ from the model's)")
        self._build_computed_buffers()

    def _build_computed_buffers(self) -> None:
        """Give the buffers a checkpoint never stores (rotary frequencies, position ids) their values
        on ``device``, computed as transformers computes them when it loads a model: they are small,
        and the model's forward needs them whichever part runs."""
        init = getattr(self.model, "_init_weights", None)
        for module in self.model.modules():
            computed = [n for n in module._non_persistent_buffers_set if module._buffers.get(n) is not None]
            if not computed or not any(module._buffers[n].is_meta for n in computed):
                continue
            for name in computed:
                module._buffers[name] = torch.empty_like(module._buffers[name], device=self.device)
            if init is None:
                raise SqueezeError(f"cannot stream {type(self.model).__name__}: it has no way to compute its buffers {', '.join(computed)}")
            # its parameters are still on the meta device: only the buffers get values here
            init(module)

    def outside(self, side: str = "all") -> list[str]:
        """Names of the parameters and persistent buffers outside the blocks, a tied weight once
        (under its first name). ``side`` "input" leaves out the output embeddings (the head: the
        text goes in without it), "output" the input embeddings (the head's logits come without
        them), unless the two are tied."""
        skip: set[int] = set()
        if side != "all":
            ends = {"input": _params(self.model, "get_input_embeddings"), "output": _params(self.model, "get_output_embeddings")}
            other = "output" if side == "input" else "input"
            skip = ends[other] - ends[side]
        inside = f"{self.prefix}."
        seen: set[int] = set()
        names = []
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name.startswith(inside) or id(tensor) in seen or id(tensor) in skip:
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
            value = stored_tensor(module, attr, stored).contiguous()  # the layout the model holds (squeeze.linears)
            value = value.to(device=self.device, dtype=self.dtype if stored.is_floating_point() else None)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
        self.live += 1
        self.peak_parts = max(self.peak_parts, self.live)

    def materialise_outside(self, side: str = "all") -> None:
        """Read everything outside the blocks (embeddings, final norm, head), or one ``side`` of it
        (see :meth:`outside`), tied weights tied again."""
        self.materialise(self.outside(side))
        self._tie()

    def _tie(self) -> None:
        tie = getattr(self.model, "tie_weights", None)
        if tie is not None:
            tie()

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

    def release(self, module: nn.Module, replaced: list[nn.Module] = ()) -> None:
        """Give ``module``'s memory back: its tensors (and those of the ``replaced`` modules it
        held before a pass swapped them out) go to the meta device, and the process returns the
        freed memory to the system (see :func:`return_freed_memory`)."""
        for old in (module, *replaced):
            old.to("meta")
        self.live -= 1
        return_freed_memory()

    def release_outside(self) -> None:
        """Send the parts outside the blocks (embeddings, final norm, head) back to the meta device;
        the buffers computed from the config stay."""
        inside = f"{self.prefix}."
        # every name, tied copies too: a head left holding the embeddings' tensor would keep it alive
        for name in [n for n in self.model.state_dict(keep_vars=True) if not n.startswith(inside)]:
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(module._parameters[attr].to("meta"), requires_grad=False)
            elif attr not in module._non_persistent_buffers_set:
                module._buffers[attr] = module._buffers[attr].to("meta")
        self._tie()  # tied on the meta device too: which side a tensor belongs to reads the ties
        self.live -= 1
        return_freed_memory()


def _params(model: nn.Module, getter: str) -> set[int]:
    """The ids of the parameters of the model's input or output embeddings (none if it has none)."""
    try:
        module = getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return set()
    return {id(p) for p in module.parameters()} if isinstance(module, nn.Module) else set()


def _libc(function: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 4 << 20


def map_large_allocations() -> None:
    """(glibc) Serve every allocation of at least MMAP_THRESHOLD bytes from its own memory map,
    handed back to the system when freed, for the rest of the process.

    By default glibc raises that threshold each time it frees a mapped block, up to 32 MiB, and
    then serves the block-sized tensors of a streamed pass (weights, Hessians, activations) from its
    heap, which fragments: holes that no later tensor fits, and that malloc_trim cannot return.
    The price is time: each such tensor's pages are mapped and zeroed afresh. A 1 MiB threshold
    slowed a GPTQ solve by about 60%; at 4 MiB a streamed 16-block GPTQ pass (hidden 1024) peaked
    12% lower and took 15% longer than with glibc's default (benchmarks/stream_heap.py)."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def return_freed_memory() -> None:
    """Collect young garbage, then (glibc) hand freed heap memory back to the system. Without it,
    a stream of block-sized tensors freed one after another leaves the process holding a growing
    heap: on a 16-block model, 1.8 GB peak instead of 0.9 GB. A full collection (every generation)
    freed no more and cost 0.2 s a call, a quarter of a streamed Wanda pass on SmolLM2."""
    gc.collect(1)
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
