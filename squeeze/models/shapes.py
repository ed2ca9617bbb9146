"""Whether a model built from its config.json fits the weights beside it, from the safetensors
headers alone, before a byte of the weights is read.

Loading trusts config.json: a wrong width or layer count otherwise shows as a traceback after
gigabytes are allocated, or as blocks quietly filled with random numbers. Here the model built
on the meta device is held against the checkpoint: every stored tensor transformers would load
into a parameter has the parameter's shape, the checkpoint holds exactly the blocks the model
has, and the model asks for no large memory the checkpoint does not back. Checkpoint names are
mapped to the model's as transformers maps them when it loads (renamings, conversions, the base
model's prefix added or dropped).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose, WeightConverter, WeightRenaming, rename_source_key

from squeeze.calib.blocks import block_stacks
from squeeze.errors import SqueezeError
from squeeze.models.checks import CONFIG_RANGES, LAYER_FIELDS, StoredTensor, shown

# Bytes of buffers (rotary tables, position ids, causal masks) a model may build from its config
# when it loads; they are not in the checkpoint, so nothing else bounds them.
MAX_BUFFER_BYTES = 2**30
# Stored dtypes that hold a real parameter's values one for one; a quantized checkpoint packs its
# integer weights into other shapes, so only these are compared there.
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

# conversions that only stack, join or transpose stored tensors, so keep their count of values
_JOINING = (MergeModulelist, Concatenate, Transpose)

Build = Callable[[Any], nn.Module]  # a config object → its model on the meta device


def check_fits_weights(model: nn.Module, config: dict[str, Any], tensors: dict[str, StoredTensor], spec: str, build: Build) -> None:
    """Raise SqueezeError with one line naming the config.json fields and the tensor that disagree
    unless ``model`` (built on the meta device from ``config``, the parsed config.json) fits
    ``tensors`` (the checkpoint's, from its headers). ``build`` builds a model from a config object
    the same way; on a failure, the fields behind a wrong shape are found by rebuilding."""
    if tensors:
        _Fit(model, config, tensors, spec, build).check()


def model_names(model: nn.Module, stored: list[str]) -> dict[str, tuple[str, WeightConverter | None]]:
    """Each stored tensor's name in ``model`` as transformers renames it when it loads, and the
    conversion that makes it, if more than a renaming does (experts merged, a projection split)."""
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    state = model.state_dict()
    prefix = model.base_model_prefix or None
    out = {}
    for key in stored:
        name, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if name not in state and key in state:  # as transformers does: a name the model has is kept
            name, pattern = rename_source_key(key, [], [], prefix, state)
        out[key] = (name, by_pattern.get(pattern) if pattern is not None else None)
    return out


class _Fit:
    """One model held against one checkpoint."""

    def __init__(self, model: nn.Module, config: dict[str, Any], tensors: dict[str, StoredTensor], spec: str, build: Build) -> None:
        self.model, self.config, self.tensors, self.spec, self.build = model, config, tensors, spec, build
        self.wanted = _tensors(model)
        self.names = model_names(model, list(tensors))
        self.fitting: set[str] = set()  # the model's tensors that a stored one fits exactly
        # stored names the model drops on purpose when it loads (DeepSeek-V3's multi-token
        # prediction block after the last, model.layers.61)
        ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
        self.dropped = re.compile("|".join(f"({pattern})" for pattern in ignored)) if ignored else None

    def check(self) -> None:
        """Every check, the cheapest and most telling first: names, blocks, shapes, memory."""
        loaded = {stored: name for stored, (name, _) in self.names.items() if name in self.wanted}
        if not loaded:
            example = next(iter(dict(self.model.named_parameters())), "nothing")
            raise SqueezeError(
                f"model {self.spec}: none of the checkpoint's {len(self.tensors)} tensors is one the model built from config.json has "
                f"(it wants {shown(example)}; the checkpoint holds {shown(next(iter(self.tensors)))})"
            )
        self.check_blocks()
        packed = "quantization_config" in self.config or "compression_config" in self.config
        # a quantized checkpoint packs its integer weights into other shapes: the others are compared
        codes = {name for stored, name in loaded.items() if packed and self.tensors[stored].dtype not in _FLOAT_DTYPES}
        loaded = {stored: name for stored, name in loaded.items() if name not in codes}
        one_to_one = {stored: name for stored, name in loaded.items() if self.names[stored][1] is None}
        self.fitting = {name for stored, name in one_to_one.items() if tuple(self.wanted[name].shape) == self.tensors[stored].shape}
        for stored, name in one_to_one.items():
            tensor, target = self.tensors[stored], self.wanted[name]
            if name not in self.fitting:
                dims = [i for i in range(max(target.ndim, len(tensor.shape))) if _dim(target.shape, i) != _dim(tensor.shape, i)]
                raise self.misfit(
                    name, lambda other: any(_dim(other.shape, i) != _dim(target.shape, i) for i in dims),
                    f"{tensor.file} holds {'it' if stored == name else shown(stored)} as {list(tensor.shape)}",
                )
            if tensor.dtype == "C64" and not target.is_complex():
                raise SqueezeError(f"model {self.spec}: {tensor.file} holds {shown(stored)} as complex numbers (C64); the model's {name} is real")
        self.check_merged([stored for stored in loaded if self.names[stored][1] is not None])
        self.check_memory(packed, codes)

    def check_blocks(self) -> None:
        """Each stack of blocks the model has is the stack the checkpoint holds: block 0 up to the
        model's last, none missing and none beyond (a stack whose names the checkpoint does not use
        at all is left to the other checks)."""
        base = self.model.base_model_prefix
        try:
            stacks = block_stacks(self.model)
        except SqueezeError:  # no list of blocks to count: the shapes are still compared
            return
        for prefix, blocks in stacks:
            forms = {prefix, f"{base}.{prefix}", prefix.removeprefix(f"{base}.")} if base else {prefix}
            pattern = re.compile(rf"(?:{'|'.join(re.escape(f) for f in forms)})\.(\d+)\.")
            held = {int(m.group(1)) for name, _ in self.names.values() if (m := pattern.match(name)) and not self.is_dropped(name)}
            if not held:
                continue
            count = len(blocks)
            fields = " and ".join(f"{f} = {count}" for f in LAYER_FIELDS if self.config.get(f) == count)
            said = f"config.json gives {fields}" if fields else f"the model built from config.json has {count} blocks in {prefix}"
            if max(held) >= count:
                raise SqueezeError(f"model {self.spec}: {said}, but the checkpoint holds {max(held) + 1} blocks ({prefix}.{max(held)} is its last)")
            if len(held) < count:
                gap = min(set(range(count)) - held)
                raise SqueezeError(
                    f"model {self.spec}: {said}, but the checkpoint holds no tensor of block {prefix}.{gap} (it has {len(held)} blocks)"
                )

    def is_dropped(self, name: str) -> bool:
        """Whether transformers drops the stored tensor it names ``name`` when it loads."""
        return name not in self.wanted and self.dropped is not None and self.dropped.search(name) is not None

    def check_merged(self, converted: list[str]) -> None:
        """Stored tensors that a conversion only stacks or joins into one of the model's (a mixture
        of experts' weights, one tensor per expert, into one fused tensor) hold, together, as many
        values as it."""
        merged: dict[str, list[str]] = {}
        for stored in converted:
            name, converter = self.names[stored]
            if len(converter.target_patterns) == 1 and all(isinstance(op, _JOINING) for op in converter.operations):
                merged.setdefault(name, []).append(stored)
        for name, parts in merged.items():
            held, target = sum(_numel(self.tensors[stored].shape) for stored in parts), self.wanted[name]
            if held != target.numel():
                raise self.misfit(
                    name, lambda other: other.numel() != target.numel(),
                    f"the {len(parts)} stored tensors it is made of ({shown(parts[0])}, ...) hold {held:,} values, not {target.numel():,}",
                )

    def check_memory(self, packed: bool, codes: set[str]) -> None:
        """The model asks for no large memory the checkpoint does not back: its buffers stay under
        ``MAX_BUFFER_BYTES``, and the parameters no stored tensor fills one for one hold fewer values
        than the checkpoint (a packed checkpoint, where ``codes`` are the weights stored under their
        own names but packed: see :meth:`check_packed`)."""
        stored = {name for name, _ in self.names.values()}
        buffers = {name: b for name, b in self.model.named_buffers() if name not in stored}
        buffer_bytes = sum(b.numel() * b.element_size() for b in buffers.values())
        if buffer_bytes > MAX_BUFFER_BYTES:
            name, largest = max(buffers.items(), key=lambda item: item[1].numel() * item[1].element_size())
            raise self.misfit(
                name, lambda other: other.shape != largest.shape,
                f"it asks for {buffer_bytes / 2**30:,.1f} GiB of buffers the checkpoint does not hold, more than {MAX_BUFFER_BYTES / 2**30:g}",
            )
        unstored = {name: p for name, p in self.model.named_parameters() if name not in stored or name in codes}
        if packed:
            self.check_packed(unstored)
            return
        values, held = sum(p.numel() for p in unstored.values()), sum(_numel(t.shape) for t in self.tensors.values())
        if values > held:
            name, largest = max(unstored.items(), key=lambda item: item[1].numel())
            raise self.misfit(
                name, lambda other: other.numel() != largest.numel(),
                f"no stored tensor fills it, and the model's {values:,} values that none fills outnumber the {held:,} the checkpoint holds",
            )

    def check_packed(self, unstored: dict[str, torch.Tensor]) -> None:
        """In a packed checkpoint, the stored tensors of each module whose weights none fills one for
        one (codes, scales, masks) hold at least one bit for each value the module's weights have:
        no format stores a weight in less."""
        bits: dict[str, int] = {}
        for stored, (name, _) in self.names.items():
            parts = name.split(".")
            for depth in range(1, len(parts)):
                module = ".".join(parts[:depth])
                bits[module] = bits.get(module, 0) + 8 * self.tensors[stored].nbytes
        wanted: dict[str, list[str]] = {}
        for name in unstored:
            wanted.setdefault(name.rpartition(".")[0], []).append(name)
        for module, names in wanted.items():
            values = sum(unstored[name].numel() for name in names)
            if module in bits and values > bits[module]:
                name = max(names, key=lambda n: unstored[n].numel())
                raise self.misfit(
                    name, lambda other: other.numel() != unstored[name].numel(),
                    f"the checkpoint's tensors of {module} hold {bits[module] // 8:,} bytes, less than a bit for each of its {values:,} values",
                )

    def misfit(self, name: str, differs: Callable[[torch.Tensor], bool], why: str) -> SqueezeError:
        """The error for the model's tensor ``name`` not fitting the checkpoint for reason ``why``,
        naming the config.json fields behind its shape (see :meth:`fields_behind`)."""
        fields = self.fields_behind(name, differs)
        return SqueezeError(
            f"model {self.spec}: config.json does not fit its weights: {f'with {fields}, ' if fields else ''}"
            f"the model's {name} is {list(self.wanted[name].shape)}, but {why}"
        )

    def fields_behind(self, name: str, differs: Callable[[torch.Tensor], bool]) -> str:
        """The config.json sizes behind a wrong shape of the model's tensor ``name``: each size is
        doubled in turn and the model rebuilt; a size counts when that changes the tensor as
        ``differs`` says and, where some do, changes none of the tensors that fit already (their
        sizes are right). "" when none is found."""
        behind, harmless = [], []
        for field, value in self.config.items():
            if field not in CONFIG_RANGES or field in LAYER_FIELDS or not isinstance(value, int) or isinstance(value, bool):
                continue
            changed = copy.deepcopy(self.model.config)
            try:
                setattr(changed, field, 2 * value)
                rebuilt = _tensors(self.build(changed))
            except Exception:  # a doubled size some model rejects: it tells nothing
                continue
            if name in rebuilt and differs(rebuilt[name]):
                behind.append(f"{field} = {value}")
                if all(n not in rebuilt or rebuilt[n].shape == self.wanted[n].shape for n in self.fitting):
                    harmless.append(f"{field} = {value}")
        return " and ".join(harmless or behind)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by every name it has (tied ones under each)."""
    return {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}


def _dim(shape: tuple[int, ...] | torch.Size, index: int) -> int | None:
    return shape[index] if index < len(shape) else None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
