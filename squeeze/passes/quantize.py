"""The quantize pass: its own step on the pass skeleton (squeeze.passes.skeleton)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from squeeze.errors import OptionError, literal
from squeeze.formats import Written, quantized_format
from squeeze.formats.compressed_tensors import quantization_config
from squeeze.formats.files import MAX_SHARD_BYTES, dense_tensors, write_config_files
from squeeze.formats.sparse import sparsity_config
from squeeze.passes.common import GENERATION_PROMPTS, Prepared, SparseInput, sparsity_report
from squeeze.passes.skeleton import CompressionStep, ReportParts, RunSettings
from squeeze.passes.launch import run_compression
from squeeze.progress import Progress
from squeeze.quant.apply import plan_quantize, quantize_model
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.layers import QuantizeResult, ignored_layers
from squeeze.quant.methods import METHODS
from squeeze.quant.rotate import RotateResult, rotate_model
from squeeze.report import LayerReport, Report
from squeeze.sizes import parse_size


STREAMED_FORMATS = ("compressed-tensors",)  # the formats a streamed quantization writes, one part at a time


class QuantizeStep(CompressionStep):
    """Replace the targeted Linear layers by quantized ones with ``config``'s method; write them in its format."""

    name = "quantize"

    def __init__(self, config: QuantizeConfig) -> None:
        self.config = config
        self.method = METHODS.get(config.method)
        self.format = quantized_format(config.format, config.format_options)
        self.result: QuantizeResult | None = None
        self.rotated: RotateResult | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.config.needs_calibration

    def check(self, run: RunSettings) -> None:
        self.format.check(self.config.scheme, self.config.method)

    def plan(self, model: nn.Module) -> dict:
        return plan_quantize(model, self.config)

    def check_tokenizer(self, tokenizer_of: Callable[[], object], config) -> None:
        if self.format.reads_tokenizer:
            self.format.check_tokenizer(tokenizer_of(), config)

    def start(self, prep: Prepared) -> tuple[str, int]:
        layers = prep.plan
        self.linear_before = sum(m.weight.numel() * prep.loaded.stored_dtype.itemsize for m in layers.values())
        self.parameters = sum(m.weight.numel() for m in layers.values())
        self.input = SparseInput()  # a pruned input keeps its zeros
        if not any(m.weight.is_meta for m in layers.values()):
            self.observe_part(layers)
        self.calib_windows = prep.calib_windows
        self.linear_flops = prep.linear_flops
        self.linear_after = 0
        self.parts: list[QuantizeResult] = []
        self.stored_dtype = prep.loaded.stored_dtype
        return self.method.steps(prep.loaded.model, layers)

    def observe_part(self, layers: dict[str, nn.Module]) -> None:
        for name, module in layers.items():
            self.input.add(name, module.weight)

    def compress(self, model: nn.Module, calibration, on_step: Callable[[str], None]) -> float:
        if self.config.rotate != "none":
            if self.input.structure is not None:
                raise OptionError(
                    f"{{0}} {self.config.rotate} would fill in the zeros of this pruned model ({self.input.structure}), "
                    "since a rotation makes every weight nonzero: drop {0}", "rotate",
                )
            # the evaluation's reference was recorded before this: the rotated model is scored against the original
            self.rotated = rotate_model(model, self.config.rotate_seed)
        self.result = quantize_model(model, self.config, calibration, on_step=on_step)
        self.format.round_kept(model)
        return self._finish()

    def _finish(self) -> float:
        assert self.result is not None
        self.sparse_input = self.input.structure
        self.sparsity = None
        if self.sparse_input is not None:
            zeros = sum(self.input.zeros.values())
            self.sparsity = sparsity_report(
                self.sparse_input, zeros / max(self.parameters, 1),
                [(e.shape[0] * e.shape[1], e.zeros) for e in self.result.layers], self.linear_flops,
            )
        return self.result.calibration_s

    def check_stream(self, run: RunSettings) -> None:
        method, fmt = self.config.method, self.config.format
        if self.config.rotate != "none":
            raise OptionError(f"{{0}} holds one block at a time; {{1}} {self.config.rotate} changes the embeddings, every block and the head together", "stream", "rotate")
        if self.config.needs_calibration and not self.method.blockwise:
            raise OptionError(f"{{0}} cannot measure static activation ranges with {literal(method)}: the whole model would run at once", "stream")
        if fmt not in STREAMED_FORMATS:
            raise OptionError(f"{{0}} writes {' or '.join(STREAMED_FORMATS)}: drop {{1}} {literal(fmt)}", "stream", "format")

    @property
    def blockwise(self) -> bool:
        return self.method.blockwise

    def compress_part(self, model: nn.Module, names: tuple[str, ...], on_step: Callable[[str], None]) -> None:
        self.parts.append(self.method.run(model, dataclasses.replace(self.config, targets=names, ignore=()), None, on_step))

    def finish_parts(self) -> float:
        self.result = QuantizeResult(
            layers=[e for r in self.parts for e in r.layers], quantized=[n for r in self.parts for n in r.quantized],
            ignored=[], notes=[note for r in self.parts for note in r.notes],
        )
        return self._finish()

    def part_tensors(self, part: nn.Module, base: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in part.named_modules():
            if isinstance(module, self.format.layer_type):
                tensors.update(self.format.layer_tensors(base + name, module))
                self.linear_after += self.format.weight_bytes(module)
        tensors.update({base + k: v for k, v in dense_tensors(part, dtype, skip=self.format.layer_type).items()})
        return tensors

    def write_config(self, model: nn.Module, prep: Prepared, folder: Path) -> list[str]:
        assert self.result is not None
        if not self.result.ignored:
            self.result.ignored = ignored_layers(model, dict.fromkeys(self.result.quantized))
        sparsity = None
        if self.sparsity is not None:
            sparsity = sparsity_config("dense", self.sparse_input, self.sparsity.sparsity, [e.name for e in self.result.layers if e.zeros])
        config = quantization_config(self.config.scheme, self.result.ignored, sparsity)
        write_config_files(model, folder, config, prep.loaded.tokenizer, prep.loaded.stored_dtype)
        return list(self.format.notes)

    def write(self, model: nn.Module, prep: Prepared, folder: Path, max_shard_bytes: int) -> Written:
        config, result = self.config, self.result
        assert result is not None
        sparsity = None
        if self.sparsity is not None:
            sparsity = (self.sparse_input, self.sparsity.sparsity, [e.name for e in result.layers if e.zeros])
        self.linear_after = sum(self.format.weight_bytes(m) for m in model.modules() if isinstance(m, self.format.layer_type))
        return self.format.write(
            model, config.scheme, result.ignored, folder, tokenizer=prep.loaded.tokenizer, dtype=prep.loaded.stored_dtype,
            method={"method": config.method, **config.options.settings()}, sparsity=sparsity, max_shard_bytes=max_shard_bytes,
        )

    def report(self, model: nn.Module, prep: Prepared, written: Written, run: RunSettings, out: Path) -> ReportParts:
        config, result, sparsity = self.config, self.result, self.sparsity
        assert result is not None
        notes = list(result.notes)
        if self.rotated is not None:
            notes = self.rotated.notes(self.stored_dtype) + notes
        if sparsity is not None:
            zeros = sum(self.input.zeros.values())
            lost = sum(e.zeros_lost for e in result.layers)
            notes.append(
                f"the model was pruned ({self.sparse_input}, {sparsity.target:.2%} zeros): {zeros - lost:,} of its {zeros:,} "
                f"zero weights are still exactly zero after quantization" + (f"; {lost:,} are not" if lost else "")
            )
        settings = {
            "method": config.method,
            **config.options.settings(),
            "scheme": self.format.describe_scheme(config.scheme),
            "format": self.format.describe(config.scheme),
            "targets": list(config.targets) or ["all Linear layers"],
            "ignore": list(config.ignore),
            "full_precision_linear_layers": result.ignored,
            "rotate": config.rotate,
            **({"rotate_seed": config.rotate_seed} if config.rotate != "none" else {}),
            **run.calibration_line(self.calib_windows, self.method.no_data),
        }
        layers = [
            LayerReport(
                e.name, e.shape, e.relative_error, e.max_abs_error, e.output_error, e.method_loss,
                *((e.zeros / (e.shape[0] * e.shape[1]), e.shape[0] * e.shape[1] - e.zeros) if sparsity else (None, None)),
            )
            for e in result.layers
        ]
        return ReportParts(
            settings=settings,
            compressed_parameters=self.parameters,
            linear_bytes_before=self.linear_before,
            linear_bytes_after=self.linear_after,
            layers=layers,
            notes=notes + written.notes,
            sparsity=sparsity,
            loading=self.format.loading(out, prep.source.kind),
        )


def quantize(
    model: str,
    out: Path,
    config: QuantizeConfig,
    data: str = "wikipedia",
    calibration_data: str | None = None,
    eval_tokens: int = 16384,
    seq_len: int = 512,
    calibration_samples: int = 128,
    batch_size: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    evaluate: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    reference: str | None = None,
    measure_speed: bool = False,
    generation_prompts: int = GENERATION_PROMPTS,
    max_shard_size: int | str = MAX_SHARD_BYTES,
    stream: bool = False,
    spill_calibration: bool = False,
    memory_budget: int | str | None = None,
) -> Report | None:
    """Quantize ``model`` with ``config``; write the checkpoint (``config.format``) and the report to ``out``.

    ``data`` is the text source for evaluation (and for calibration unless ``calibration_data``
    names another); calibration and evaluation use disjoint documents of it. ``eval_tokens`` is
    rounded down to whole windows of ``seq_len`` tokens. Returns the report (also written to
    ``out/report.json`` and ``out/report.md``). ``dtype`` is the compute dtype: the model is
    loaded, calibrated and evaluated in it (the original it is compared with too); unquantized
    tensors are saved in the dtype the source stores. ``trust_remote_code`` lets transformers run
    code shipped with the model; it is never implied. ``reference`` names the model the evaluation
    compares with (default: ``model`` itself), e.g. the original of a chain of passes.
    ``max_shard_size`` (bytes, or a size such as "5GB") bounds each safetensors file written.
    ``stream`` holds one transformer block in memory at a time (see squeeze.passes.stream);
    with ``spill_calibration`` too, the calibration activations are kept on disk, beside ``out``,
    one batch in memory at a time (squeeze.calib.spill; the memory budget turns it on by itself
    when only that fits). A streamed pass scores generation agreement streamed too, each model
    read one block at a time for every new token (squeeze.stream.generation).
    Under torchrun every process calls this and they share the calibration (squeeze.passes.launch);
    process 0 writes and returns the report, the others return None.
    """
    run = RunSettings(
        data, calibration_data, eval_tokens, seq_len, calibration_samples, batch_size, device, dtype, evaluate, overwrite,
        trust_remote_code, reference, measure_speed, generation_prompts, parse_size(max_shard_size, "max_shard_size"), stream,
        spill_calibration, parse_size(memory_budget, "memory_budget") if memory_budget is not None else None,
    )
    return run_compression(QuantizeStep(config), model, out, run, progress)
