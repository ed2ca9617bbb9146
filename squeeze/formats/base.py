"""What a checkpoint format is: the contract each file in squeeze/formats fulfils.

A format is a class with a name, the suffix it adds to a default output folder name, its writer,
and, where squeeze can read it back, a reader with the cheap test that recognises its folders.
:class:`QuantizedFormat` (what ``squeeze quantize --format`` writes) adds the schemes and methods it
accepts, the layer it stores and that layer's tensors; :class:`PrunedFormat` (``squeeze prune
--format``) how it stores a pruned weight. The registries in squeeze/formats/__init__.py map names
to instances: adding a format is one file here and one line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4
    from transformers.modeling_utils import no_init_weights

from squeeze.errors import OptionError, literal
from squeeze.formats.files import MAX_SHARD_BYTES
from squeeze.linears import is_transposed
from squeeze.options import MethodOptions, MethodRegistry, Registry, as_options
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.scheme import QuantScheme

InputRange = tuple[torch.Tensor, torch.Tensor]
# (structure, overall sparsity, sparse layer names) of a model that was pruned before quantizing
Sparsity = tuple[str, float, list[str]]

# layer tensors that are not weight data: constant-size metadata (shapes, bitsandbytes' state and
# level table), activation scales and biases
_NOT_WEIGHT = ("bias", "input_scale", "input_zero_point", "weight_shape", "quant_map", "bitsandbytes__nf4")


@dataclass
class Written:
    """What a writer wrote: the safetensors files, and notes a consumer of the checkpoint should read."""

    files: list[Path]
    notes: list[str]


@dataclass(frozen=True)
class FixedScheme:
    """The one scheme a format stores (bnb-nf4: 4-bit NormalFloat in blocks of 64): options left
    open take these values, ``check`` refuses others, and names and reports use its own words."""

    mode: str
    bits: int
    group_size: int | None
    label: str  # in place of the scheme in default output names and recipe stage labels
    description: str  # in place of scheme.describe() in reports

    def fill(self, mode: str | None, bits: int | None, group_size: int | None) -> tuple[str, int, int | None]:
        """``mode``, ``bits`` and ``group_size`` with the ones left open (None) set to this scheme's."""
        mode, bits = mode or self.mode, bits or self.bits
        return mode, bits, group_size or (self.group_size if mode == self.mode else None)


class Format:
    """Base of every checkpoint format."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # the name and who reads it, for --format's help, e.g. "gptq (GPTQModel, transformers + optimum)"
    suffix: ClassVar[str] = ""  # appended to a default output folder name, e.g. "-gptq"
    notes: ClassVar[tuple[str, ...]] = ()  # what a consumer of any checkpoint in this format should know
    files_written: ClassVar[str] = "{name} safetensors, config.json"  # what the output folder holds besides the report

    def recognises(self, folder: Path) -> bool:
        """Whether ``folder`` holds a checkpoint of this format that :meth:`read` takes; reads
        config.json only. False for formats squeeze does not read back."""
        return False

    def read(self, folder: Path, kind: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
        """The checkpoint in ``folder`` as squeeze evaluates it: a model of ``kind`` ("causal" or
        "encoder") in ``dtype`` on the CPU. Only for folders that :meth:`recognises` accepts."""
        raise NotImplementedError(f"squeeze does not read {self.name} checkpoints back")

    def loading(self, folder: Path, kind: str) -> str:
        """Markdown for report.md saying how to load the checkpoint without squeeze, when it takes
        more than ``from_pretrained`` ("" otherwise)."""
        return ""


def initialisation_reads_weight(model: nn.Module, layers: list[str]) -> str | None:
    """The first ``name.weight`` of ``layers`` that transformers' weight initialisation of
    ``model`` reads, or None.

    transformers 5 runs the model's ``_init_weights`` on every module while loading a checkpoint;
    some architectures (Falcon, ModernBERT, GPT-2) read a Linear layer's ``weight`` there, which
    a packed quantized layer no longer has, and loading fails. Each layer's weight is taken away
    for a moment and the initialisation run with every tensor of the model on the meta device
    (where writing costs nothing and changes nothing); then everything is put back."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return None
    held = {name: model.get_submodule(name) for name in layers}
    names = {module: name for name, module in model.named_modules()}
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        for module, parameters, buffers in saved:
            for key, value in parameters.items():
                if value is not None:
                    module._parameters[key] = nn.Parameter(value.detach().to("meta"), requires_grad=False)
            for key, value in buffers.items():
                if value is not None:
                    module._buffers[key] = value.to("meta")
        taken = [name for name, module in held.items() if module._parameters.pop("weight", None) is not None]
        for module in list(model.modules()):
            try:
                with torch.no_grad(), no_init_weights():
                    init(module)
            except AttributeError as exc:
                if "has no attribute 'weight'" not in str(exc) or not taken:
                    raise
                inside = [n for n in taken if n == names[module] or n.startswith(f"{names[module]}.")]
                return f"{inside[0] if inside else taken[0]}.weight"
    finally:
        for module, parameters, buffers in saved:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
    return None


class QuantizedFormat(Format):
    """A format for quantized models: which schemes and methods it stores, and how.

    A format may have options of its own (``Options``, declared as a method's are; ``--gguf-type``):
    the registry holds each format with its defaults, :meth:`with_options` gives one with others."""

    layer_type: ClassVar[type[nn.Module]] = QuantizedLinear  # the layer it stores, made by quantized_layer
    fixed_scheme: ClassVar[FixedScheme | None] = None
    Options: ClassVar[type[MethodOptions]] = MethodOptions  # the format's own options (none by default)
    reads_tokenizer: ClassVar[bool] = False  # check_tokenizer has something to check

    def __init__(self, options: MethodOptions | dict[str, Any] | None = None) -> None:
        self.options = as_options(self.Options, options)

    def with_options(self, options: MethodOptions | dict[str, Any] | None) -> QuantizedFormat:
        """This format with ``options`` (its Options model or a mapping; validated, OptionError naming the bad one)."""
        return type(self)(options)

    def fill_scheme(
        self, mode: str | None, bits: int | None, group_size: int | None, asym: bool | None,
    ) -> tuple[str | None, int | None, int | None, bool | None]:
        """The scheme options a user left open (None) set to what this format stores, where it
        decides them (bnb-nf4: 4-bit blocks of 64); the method's defaults fill the rest."""
        if self.fixed_scheme is None:
            return mode, bits, group_size, asym
        mode, bits, group_size = self.fixed_scheme.fill(mode, bits, group_size)
        return mode, bits, group_size, asym

    def check_tokenizer(self, tokenizer: Any, config: Any) -> None:
        """Raise SqueezeError when the model's ``tokenizer`` cannot be written (only formats that
        ``reads_tokenizer`` store it in their own words)."""

    def round_kept(self, model: nn.Module) -> None:
        """After quantization, before the evaluation: give the tensors the format stores in reduced
        precision of its own choosing the values it will store (nothing, for most formats)."""
    records_sparsity: ClassVar[bool] = False  # has a field saying which zeros a pruned model keeps
    # why transformers cannot load this format's quantized ``Conv1D`` layers (GPT-2's, held as
    # squeeze.linears.TransposedLinear); None: it loads them
    transposed_refusal: ClassVar[str | None] = None

    def check(self, scheme: QuantScheme, method: str) -> None:
        """Raise SqueezeError when ``scheme`` or ``method`` cannot be stored (cheap; run first)."""

    def drops_weight(self, scheme: QuantScheme) -> bool:
        """Whether a layer stored in this format has no ``weight`` tensor any more (packed codes):
        then a model whose transformers initialisation reads that weight cannot be loaded."""
        return False

    def check_model(self, model: nn.Module, layers: list[str], scheme: QuantScheme) -> None:
        """Raise SqueezeError when quantizing ``layers`` of ``model`` gives a checkpoint this format
        cannot hold (the meta model is enough: only names and shapes are read)."""
        transposed = [n for n in layers if is_transposed(model.get_submodule(n))]
        if transposed and self.transposed_refusal is not None:
            loads = " or ".join(
                f.name for f in QUANTIZED_FORMATS if f.transposed_refusal is None and not f.drops_weight(scheme)
            )
            raise OptionError(
                f"{literal(self.name)} cannot hold the quantized Conv1D layer {literal(transposed[0])} of "
                f"{literal(type(model).__name__)} ({literal(self.transposed_refusal)}); use {{0}} {literal(loads)}, "
                "or leave the Conv1D layers out with {1}", "format", "ignore",
            )
        reads = initialisation_reads_weight(model, layers) if self.drops_weight(scheme) else None
        if reads is not None:
            raise OptionError(
                f"transformers cannot load {literal(type(model).__name__)} with {literal(self.describe(scheme))} layers: "
                f"its weight initialisation reads {literal(reads)}, which such a layer does not have; "
                "quantize W8A8 instead ({0} per-token: its layers keep .weight), or leave that layer out with {1}",
                "act", "ignore",
            )

    def describe(self, scheme: QuantScheme) -> str:
        """The format in a report's words, e.g. ``compressed-tensors (pack-quantized)``."""
        raise NotImplementedError

    def describe_scheme(self, scheme: QuantScheme) -> str:
        """The scheme in a report's words."""
        return self.fixed_scheme.description if self.fixed_scheme else scheme.describe()

    def output_name(self, scheme_name: str) -> str:
        """The part of a default output folder name after the model: ``scheme_name`` (e.g.
        ``W4A16-per-group128``), or the fixed scheme's label, then the suffix."""
        return (self.fixed_scheme.label if self.fixed_scheme else scheme_name) + self.suffix

    def quantized_layer(self, linear: nn.Linear, scheme: QuantScheme, input_range: InputRange | None = None) -> nn.Module:
        """Round-to-nearest ``linear`` into the layer this format stores (``input_range``: the
        calibrated input (min, max), for static activation scales)."""
        return QuantizedLinear.from_linear(linear, scheme, input_range)

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of one quantized layer called ``name``."""
        raise NotImplementedError

    def weight_bytes(self, layer: nn.Module) -> int:
        """Checkpoint bytes of one layer's compressed weight (codes, scales, zero points; bias excluded)."""
        tensors = self.layer_tensors("layer", layer)
        return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[2] not in _NOT_WEIGHT)

    def write(
        self,
        model: nn.Module,
        scheme: QuantScheme,
        ignored: list[str],
        out_dir: Path,
        tokenizer=None,
        dtype: torch.dtype | None = None,
        method: dict | None = None,
        sparsity: Sparsity | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ) -> Written:
        """Write ``model`` (its quantized layers of ``layer_type``; ``ignored``: the Linear layers
        left in full precision) to ``out_dir`` with config.json and tokenizer. ``dtype``: the dtype
        of the tensors that were not quantized; ``method``: the method and its settings, as the
        checkpoint's metadata records them. ``sparsity`` describes a pruned model: a format that
        ``records_sparsity`` writes it into its config, the others store the zeros as zero codes.
        Safetensors files hold at most ``max_shard_bytes`` each (a larger single tensor gets a
        file of its own), with the standard index when there are several.
        The notes: the format's own, then what this checkpoint needs said."""
        written = self._write(model, scheme, ignored, out_dir, tokenizer, dtype, method or {}, sparsity, max_shard_bytes)
        written.notes[:0] = self.notes
        if sparsity is not None and not self.records_sparsity:
            written.notes.append(
                f"{self.name} has no field for sparsity: the zeros are stored as zero codes and a loader sees a dense layer"
            )
        return written

    def _write(
        self, model: nn.Module, scheme: QuantScheme, ignored: list[str], out_dir: Path, tokenizer, dtype: torch.dtype | None,
        method: dict, sparsity: Sparsity | None, max_shard_bytes: int,
    ) -> Written:
        """The files and the notes particular to this checkpoint (see :meth:`write`)."""
        raise NotImplementedError


class PrunedFormat(Format):
    """A format for pruned, unquantized models: how a pruned Linear weight is stored."""

    def describe(self) -> str:
        """The format in a report's words."""
        return f"{self.name} (compressed-tensors sparsity_config)"

    def weight_bytes(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> int:
        """Checkpoint bytes of one pruned weight stored in ``dtype`` (default: its own)."""
        raise NotImplementedError

    def write(
        self,
        model: nn.Module,
        structure: str,
        global_sparsity: float,
        sparse_layers: list[str],
        out_dir: Path,
        tokenizer=None,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ) -> Written:
        """Write pruned ``model`` to ``out_dir``: ``sparse_layers`` (pruned with ``structure``,
        e.g. "2:4" or "unstructured", ``global_sparsity`` zeros overall) in this format's layout,
        the rest dense; ``dtype``: the dtype to store the weights in (default: as held); at most
        ``max_shard_bytes`` per safetensors file."""
        raise NotImplementedError

    def encode(self, state: dict[str, torch.Tensor], sparse_layers: list[str]) -> dict[str, torch.Tensor]:
        """``state`` (some or all of a model's tensors) with the weights of ``sparse_layers`` in this
        format's layout: what :meth:`write` stores, one part of a model at a time."""
        raise NotImplementedError

    def write_config(
        self, model: nn.Module, structure: str, global_sparsity: float, sparse_layers: list[str], out_dir: Path, tokenizer=None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """config.json (its sparsity as :meth:`write` records it) and tokenizer, without the tensors."""
        raise NotImplementedError



# The formats by name. Each format's module registers its class with ``@QUANTIZED_FORMATS.register``
# or ``@PRUNED_FORMATS.register``; squeeze/formats/__init__.py imports the modules (the order of the
# ``--format`` choices, default first).
QUANTIZED_FORMATS: MethodRegistry[QuantizedFormat] = MethodRegistry("format", "format")
PRUNED_FORMATS: Registry[PrunedFormat] = Registry("sparse checkpoint format", "format")
