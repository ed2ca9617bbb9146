"""Write quantized models as one GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python)
runs, from squeeze's own codes.

The quantized layers are stored in the GGUF block type their scheme already is
(squeeze.formats.gguf_blocks): 4-bit symmetric group-32 codes as Q4_0, asymmetric ones as Q4_1,
8-bit symmetric as Q8_0, all with float16 scales; no second rounding. A scheme without such a
type (group 64, 3 bits, quantized activations) is refused before anything runs. Tensors squeeze
keeps in full precision go as ``--gguf-embeddings`` says (F16 by default; F32, BF16 or Q8_0);
norms and biases as F32. Before the evaluation those tensors are given the values the file holds,
so the report measures the file.

The file carries the architecture's hyperparameters, the tokenizer and the chat template
(squeeze.formats.gguf_meta), and what squeeze did (``squeeze.*`` keys). squeeze reads the output
folder back as a model (it holds one .gguf file), transformers with ``gguf_file=``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from squeeze import __version__
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.formats.base import QUANTIZED_FORMATS, QuantizedFormat, Sparsity, Written
from squeeze.formats.files import dense_tensors
from squeeze.formats.gguf_blocks import BLOCK, BLOCK_TYPES, DENSE_TYPES, BlockType, as_stored, dense_array, pack_layer, packed_bytes
from squeeze.formats.gguf_meta import (
    architecture_metadata, check_architecture, gguf_name, permute_rows, tensor_names, tokenizer_metadata,
)
from squeeze.options import MethodOptions, option
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.scheme import QuantScheme

FILE_NAME = "model.gguf"  # the folder's name says the scheme


class GgufOptions(MethodOptions):
    gguf_type: str | None = option(
        None, "With --format gguf: the block type of the quantized layers, q4_0 (4-bit symmetric), q4_1 (4-bit "
        "asymmetric) or q8_0 (8-bit symmetric), all in groups of 32 (default: the one the scheme is).",
    )
    gguf_embeddings: str = option(
        "f16", "With --format gguf: how the tensors left in full precision (embeddings, head, ignored layers) are "
        "stored: f32, f16, bf16 or q8_0 (norms and biases are always f32).",
    )


@QUANTIZED_FORMATS.register
class Gguf(QuantizedFormat):
    """One GGUF file for llama.cpp (see the module docstring)."""

    name = "gguf"
    summary = "gguf (llama.cpp, Ollama, llama-cpp-python; transformers with gguf_file=)"
    suffix = "-gguf"
    files_written = FILE_NAME
    Options = GgufOptions
    reads_tokenizer = True

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        kind, kept = self.options.gguf_type, self.options.gguf_embeddings
        if kind is not None and kind not in BLOCK_TYPES:
            raise OptionError(f"unknown GGUF block type {literal(repr(kind))} for {{0}}; choose one of: {', '.join(BLOCK_TYPES)}", "gguf_type")
        if kept not in DENSE_TYPES:
            raise OptionError(f"unknown type {literal(repr(kept))} for {{0}}; choose one of: {', '.join(DENSE_TYPES)}", "gguf_embeddings")

    def fill_scheme(self, mode: str | None, bits: int | None, group_size: int | None, asym: bool | None) -> tuple:
        """Options left open take GGUF's shape: groups of 32, and the bits and symmetry of ``--gguf-type``."""
        kind = BLOCK_TYPES.get(self.options.gguf_type or "")
        if kind is not None:
            bits = bits if bits is not None else kind.bits
            asym = asym if asym is not None else kind.asym
        mode = mode or "per-group"
        if mode == "per-group" and group_size is None:
            group_size = BLOCK
        return mode, bits, group_size, asym

    def block_type(self, scheme: QuantScheme) -> BlockType:
        """The GGUF type of the quantized layers: ``--gguf-type``, else the one ``scheme`` is;
        OptionError when the scheme is not exactly that type."""
        args = scheme.weights
        by_scheme = next((t for t in BLOCK_TYPES.values() if (t.bits, t.asym) == (args.num_bits, not args.symmetric)), None)
        kind = BLOCK_TYPES[self.options.gguf_type] if self.options.gguf_type else by_scheme
        shape = args.strategy == "group" and args.group_size == BLOCK
        if kind is None or kind is not by_scheme or not shape:
            scheme_words = f"{args.num_bits}-bit {'symmetric' if args.symmetric else 'asymmetric'} {args.strategy}" + (
                f" {args.group_size}" if args.group_size else ""
            )
            wanted = kind.describe() if kind is not None else "Q4_0 (4-bit symmetric), Q4_1 (4-bit asymmetric) or Q8_0 (8-bit symmetric)"
            raise OptionError(
                f"{{0}} gguf stores {literal(wanted)} weights in groups of {BLOCK} with float16 scales; {literal(scheme_words)} "
                f"has no such GGUF type: use {{1}} per-group {{2}} {BLOCK}" + (" with {3}" if kind is None else ""),
                "format", "mode", "group_size", *(("bits",) if kind is None else ()),
            )
        return kind

    def check(self, scheme: QuantScheme, method: str) -> None:
        if scheme.input_activations is not None:
            raise OptionError(
                "{0} gguf stores weights only (llama.cpp quantizes activations itself): drop {1}", "format", "act",
            )
        if scheme.weights.scale_dtype != "float16":
            raise OptionError(
                f"{{0}} gguf stores float16 scales, not {literal(scheme.weights.scale_dtype)}: use {{1}} auto or float16",
                "format", "scale_dtype",
            )
        self.block_type(scheme)

    def check_model(self, model: nn.Module, layers: list[str], scheme: QuantScheme) -> None:
        check_architecture(model.config)
        names = tensor_names(model.config)
        for name in layers:
            if names.get_name(f"{name}.weight", try_suffixes=(".weight",)) is None:
                raise SqueezeError(f"--format gguf has no place for the quantized layer {name} in a llama.cpp model; leave it out with --ignore")
        if self.options.gguf_embeddings == "q8_0":
            chosen = set(layers)
            for key, tensor in model.state_dict().items():
                module = key.rpartition(".")[0]
                if tensor.dim() == 2 and module not in chosen and tensor.shape[-1] % BLOCK:
                    raise OptionError(
                        f"{{0}} q8_0 stores rows in blocks of {BLOCK}, and {literal(key)} has rows of {tensor.shape[-1]}: use {{0}} f16",
                        "gguf_embeddings",
                    )

    def check_tokenizer(self, tokenizer: Any, config: Any) -> None:
        tokenizer_metadata(tokenizer, config.vocab_size)

    def drops_weight(self, scheme: QuantScheme) -> bool:
        return True

    def describe(self, scheme: QuantScheme) -> str:
        kind = self.block_type(scheme)
        return f"GGUF {kind.name.upper()} (full-precision tensors {self.options.gguf_embeddings.upper()}, norms F32)"

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        kind = self.block_type(layer.scheme)
        return {f"{name}.weight": torch.from_numpy(pack_layer(layer, kind))}

    def weight_bytes(self, layer: nn.Module) -> int:
        return packed_bytes((layer.out_features, layer.in_features), self.block_type(layer.scheme).ggml)

    def round_kept(self, model: nn.Module) -> None:
        """Give the full-precision matrices (embeddings, head, ignored layers) the values
        ``--gguf-embeddings`` stores, so that the evaluation scores what the file holds."""
        seen: set[int] = set()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, QuantizedLinear):
                    continue
                for tensor in module.parameters(recurse=False):
                    if tensor.dim() == 2 and tensor.is_floating_point() and tensor.data_ptr() not in seen:
                        seen.add(tensor.data_ptr())
                        tensor.copy_(as_stored(tensor.data.cpu(), self.options.gguf_embeddings).to(tensor.device))

    def loading(self, folder: Path, kind: str) -> str:
        name = FILE_NAME
        return (
            f"llama.cpp: `llama-cli -m {folder}/{name}`; llama-cpp-python: `Llama(model_path=\"{folder}/{name}\")`; "
            f"transformers: `AutoModelForCausalLM.from_pretrained(\"{folder}\", gguf_file=\"{name}\")` (dequantized to float)"
        )

    def _write(
        self, model: nn.Module, scheme: QuantScheme, ignored: list[str], out_dir: Path, tokenizer, dtype: torch.dtype | None,
        method: dict, sparsity: Sparsity | None, max_shard_bytes: int,
    ) -> Written:
        config = model.config
        kind = self.block_type(scheme)
        if tokenizer is None:
            raise SqueezeError("--format gguf writes the tokenizer into the file, and this model has none")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / FILE_NAME
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(Path(str(getattr(config, "_name_or_path", "") or type(model).__name__)).name)  # no local path in the file
        writer.add_quantized_by(f"squeeze {__version__}")
        writer.add_file_type(int(kind.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        architecture_metadata(writer, config)
        tokenizer_metadata(tokenizer, config.vocab_size).write(writer)
        writer.add_string("squeeze.method", json.dumps(method, default=str))
        writer.add_string("squeeze.scheme", scheme.describe())
        for name, array, raw in self._tensors(model, kind):
            writer.add_tensor(name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return Written([path], [f"one GGUF file, {path.name}: quantized layers {kind.name.upper()}, "
                                f"full-precision matrices {self.options.gguf_embeddings.upper()}, norms and biases F32"])

    def _tensors(self, model: nn.Module, kind: BlockType):
        """(GGUF name, array, raw type or None) of every tensor the file holds, in the model's order."""
        config = model.config
        names = tensor_names(config)
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                target = gguf_name(names, f"{name}.weight")
                yield target, permute_rows(target, pack_layer(module, kind), config), kind.ggml
                if module.bias is not None:
                    bias = gguf_name(names, f"{name}.bias")
                    yield bias, permute_rows(bias, module.bias.detach().float().cpu().numpy(), config), None
        for key, tensor in dense_tensors(model, None, skip=QuantizedLinear).items():
            target = gguf_name(names, key)
            stored = "f32" if tensor.dim() < 2 else self.options.gguf_embeddings
            array, raw = dense_array(tensor, stored)
            yield target, permute_rows(target, np.ascontiguousarray(array), config), raw
