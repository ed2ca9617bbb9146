"""``squeeze quantize --stream``: quantize from disk to disk one transformer block at a time.

The model is built on the meta device; each block is read from the safetensors files, quantized,
handed to a shard writer and released before the next, then everything outside the blocks
(embeddings, final norm, head) is done the same way. Memory holds one block, not the model.

What streams today: the methods that read no text (``rtn`` weight-only, ``hqq``), into
compressed-tensors, without the accuracy evaluation. The tensors written are those the resident
pass writes for the same model and options.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch

from squeeze.device import resolve_device, resolve_dtype
from squeeze.errors import OptionError, literal
from squeeze.evaluate import peak_rss_bytes
from squeeze.formats import QUANTIZED_FORMATS, recognise
from squeeze.formats.compressed_tensors import quantization_config
from squeeze.formats.files import ShardWriter, dense_tensors, write_config_files
from squeeze.models import check_output_dir, load_tokenizer, meta_model, resolve_model
from squeeze.models.load import stored_dtype
from squeeze.passes.common import Stopwatch, model_info
from squeeze.passes.skeleton import publish
from squeeze.progress import NullProgress, Progress
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.layers import QuantizeResult, ignored_layers
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.methods import METHODS
from squeeze.report import LayerReport, Report, SizeReport
from squeeze.sizes import parse_size
from squeeze.stream.lazy import CheckpointTensors, LazyModel

STREAMED_FORMAT = "compressed-tensors"


def check_streamable(config: QuantizeConfig, evaluate: bool) -> None:
    """OptionError unless this quantization streams (see the module docstring)."""
    method = METHODS.get(config.method)
    if method.blockwise or method.needs_calibration(config):
        raise OptionError(
            f"{{0}} runs the methods that read no text (rtn weight-only, hqq), not {literal(config.method)}", "stream",
        )
    if config.format != STREAMED_FORMAT:
        raise OptionError(f"{{0}} writes only {STREAMED_FORMAT}: drop {{1}} {literal(config.format)}", "stream", "format")
    if evaluate:
        raise OptionError("{0} does not evaluate yet: add {1}", "stream", "no_eval")


def _exact(compute: torch.dtype, stored: torch.dtype) -> bool:
    """Whether a tensor stored in ``stored`` comes back unchanged through ``compute``."""
    return compute == stored or compute == torch.float32 and stored in (torch.float16, torch.bfloat16, torch.float32)


def stream_quantize(
    model: str,
    out: Path,
    config: QuantizeConfig,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    max_shard_size: int | str = "5GB",
    progress: Progress | None = None,
    lazy_model: list[LazyModel] | None = None,
) -> Report:
    """Quantize ``model`` (a safetensors folder or built-in) block by block into ``out`` (see the
    module docstring). ``lazy_model``, when given, receives the :class:`LazyModel` used (tests
    read its ``peak_parts``)."""
    progress = progress or NullProgress()
    watch = Stopwatch()
    check_streamable(config, evaluate=False)
    max_shard_bytes = parse_size(max_shard_size, "max_shard_size")
    compute_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    check_output_dir(out, overwrite)
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    if source.is_gguf or recognise(source.path) is not None:
        raise OptionError(f"{{0}} reads a folder of unquantized safetensors weights, and {literal(model)} is not one", "stream")
    fmt = QUANTIZED_FORMATS.get(config.format)
    fmt.check(config.scheme, config.method)
    method = METHODS.get(config.method)
    net = meta_model(source)
    planned = method.plan(net, config)
    # names only from here on: holding the planned modules would keep each one's weights alive
    # after its block is quantized and released
    layers = list(planned)
    parameters = sum(m.weight.numel() for m in planned.values())
    del planned
    lazy = LazyModel(net, CheckpointTensors(source.path), compute_dtype, device)
    if lazy_model is not None:
        lazy_model.append(lazy)
    outside_layers = tuple(n for n in layers if not n.startswith(f"{lazy.prefix}."))
    stored = stored_dtype(source)
    tokenizer = load_tokenizer(source)
    results: list[QuantizeResult] = []
    linear_after = 0

    def quantize_part(prefix: str | None) -> dict[str, torch.Tensor]:
        """Quantize the planned layers of one materialised part (a block, or with ``prefix`` None
        everything outside the blocks); its tensors as the format stores them."""
        nonlocal linear_after
        own = tuple(n for n in layers if n.startswith(f"{prefix}.")) if prefix else outside_layers
        if own:
            results.append(method.run(net, dataclasses.replace(config, targets=own, ignore=()), None))
        with nullcontext() if prefix else lazy.without_blocks():
            part = net.get_submodule(prefix) if prefix else net
            base = f"{prefix}." if prefix else ""
            tensors: dict[str, torch.Tensor] = {}
            for name, module in part.named_modules():
                if isinstance(module, QuantizedLinear):
                    tensors.update(fmt.layer_tensors(base + name, module))
                    linear_after += fmt.weight_bytes(module)
            tensors.update({base + k: v for k, v in dense_tensors(part, stored, skip=QuantizedLinear).items()})
        return tensors

    def assemble(folder: Path) -> Report:
        writer = ShardWriter(folder, max_shard_bytes)
        with watch.stage("quantize"), progress.task("quantizing block by block", len(lazy.blocks) + 1) as advance:
            for index, prefix in enumerate(lazy.blocks):
                block = lazy.block(index)
                writer.add(quantize_part(prefix))
                writer.end_part()
                lazy.release(block)
                advance(1)
            outside = lazy.outside()
            if not outside_layers and _exact(compute_dtype, stored):
                # nothing to quantize out there: its tensors go straight from the checkpoint, as the
                # resident pass would write them (cast to the stored dtype), never widened in memory
                kept = lazy.tensors.read([n for n in outside if n in lazy.tensors])
                writer.add({n: t.to(stored) if t.is_floating_point() else t for n, t in kept.items()})
            else:
                lazy.materialise(outside)
                net.tie_weights()
                writer.add(quantize_part(None))
            advance(1)
        with watch.stage("save"):
            files = writer.close()
            ignored = ignored_layers(net, dict.fromkeys(layers))
            write_config_files(net, folder, quantization_config(config.scheme, ignored), tokenizer, stored)
        return Report(
            pass_name="quantize",
            model=model_info(model, source, net),
            settings={
                "method": config.method, **config.options.settings(), "scheme": fmt.describe_scheme(config.scheme),
                "format": fmt.describe(config.scheme), "targets": list(config.targets) or ["all Linear layers"],
                "ignore": list(config.ignore), "full_precision_linear_layers": ignored, "streamed": True,
                "calibration": method.no_data, "calibration_tokens": 0,
            },
            size=SizeReport(
                parameters=sum(p.numel() for p in net.parameters()), compressed_parameters=parameters,
                disk_bytes_before=sum(p.stat().st_size for p in source.path.glob("*.safetensors")),
                disk_bytes_after=sum(f.stat().st_size for f in files), memory_bytes_before=0, memory_bytes_after=0,
                linear_bytes_before=parameters * stored.itemsize, linear_bytes_after=linear_after,
            ),
            timings_s=dict(watch.timings),
            peak_rss_bytes=peak_rss_bytes(),
            device=f"{device}, {dtype} compute",
            layers=[LayerReport(e.name, e.shape, e.relative_error, e.max_abs_error) for r in results for e in r.layers],
            notes=[f"streamed block by block ({lazy.peak_parts} part(s) in memory at most): no accuracy evaluation", *fmt.notes],
        )

    return publish(out, overwrite, assemble, watch, progress)
